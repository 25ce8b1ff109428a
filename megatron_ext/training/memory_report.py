"""``--plan-memory``: the memory planner's prediction for the command line's configuration.

Main API: :func:`model_shape_and_layout`, :func:`print_memory_plan`.
"""

from __future__ import annotations

import argparse
import os

from megatron_ext.memory_planner import (
    GIB, ModelShape, ParallelLayout, estimate_memory, longest_sequence, max_micro_batch_size)
from megatron_ext.memory_planner.estimate import expandable_segments_enabled


def model_shape_and_layout(args: argparse.Namespace, vocab_size: int):
    model = ModelShape(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
        vocab_size=vocab_size, ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups, swiglu=args.swiglu,
        untie_embeddings=args.untie_embeddings_and_output_weights,
        dropout=args.hidden_dropout > 0 or args.attention_dropout > 0)
    dp = args.data_parallel_size
    layout = ParallelLayout(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, dp=dp,
        cp=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.global_batch_size // (args.micro_batch_size * dp),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method or "uniform",
        recompute_num_layers=args.recompute_num_layers or 1,
        distributed_optimizer=args.use_distributed_optimizer,
        attention="local" if args.attention_backend == "local" else "flash")
    return model, layout


def out_of_memory_advice(args: argparse.Namespace, mem_cfg, vocab_size: int) -> str:
    """What to say when a step ran out of GPU memory: the planner's view and the knobs."""
    model, layout = model_shape_and_layout(args, vocab_size)
    kw, budget = mem_cfg.estimate_kwargs(), mem_cfg.gpu_memory_bytes
    est = estimate_memory(model, layout, **kw)
    tips = []
    if args.recompute_granularity != "full":
        tips.append("--recompute-granularity full")
    if args.micro_batch_size > 1:
        tips.append("a smaller --micro-batch-size")
    if layout.attention == "local":
        tips.append("--attention-backend auto (flash/SDPA: no s x s scores)")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        tips.append("--sequence-parallel")
    tips.append("more --tensor-model-parallel-size / --context-parallel-size")
    if not args.use_distributed_optimizer and args.data_parallel_size > 1:
        tips.append("--use-distributed-optimizer")
    return (f"the planner predicts {est.total / GIB:.1f} GiB per GPU for this configuration "
            f"(longest sequence that fits {mem_cfg.gpu_memory_gb:g} GiB: "
            f"{longest_sequence(model, layout, budget, **kw)} tokens); try "
            + ", ".join(tips) + " (python -m megatron_ext.memory_planner ... compares them)")


def print_memory_plan(args: argparse.Namespace, mem_cfg) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from megatron_ext.data.tokenizer import build_tokenizer

    vocab_size = build_tokenizer(args.tokenizer_type, args.vocab_size).vocab_size
    model, layout = model_shape_and_layout(args, vocab_size)
    kw = mem_cfg.estimate_kwargs()
    est = estimate_memory(model, layout, **kw)
    budget = mem_cfg.gpu_memory_bytes
    slack = ("expandable segments: no block slack" if expandable_segments_enabled()
             else "fragmentation includes one largest block; set PYTORCH_CUDA_ALLOC_CONF="
                  "expandable_segments:True to reduce it")
    print(f"> memory plan (per GPU, {mem_cfg.gpu_memory_gb:g} GiB budget; {slack}):")
    print(est.as_table())
    verdict = "fits" if est.total <= budget else "DOES NOT FIT"
    print(f"> predicted peak {est.total / GIB:.2f} GiB: {verdict}")
    print(f"> largest micro-batch that fits: {max_micro_batch_size(model, layout, budget, **kw)}")
    print(f"> longest sequence that fits: {longest_sequence(model, layout, budget, **kw)} tokens")
