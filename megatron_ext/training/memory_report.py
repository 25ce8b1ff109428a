"""``--plan-memory`` and the out-of-memory message: the memory planner's view of a job.

Main API: :func:`parallel_layout`, :func:`print_memory_plan`, :func:`out_of_memory_advice`.
"""

from __future__ import annotations

import os

from megatron_ext.memory_planner import (
    GIB, ParallelLayout, estimate_memory, longest_sequence, max_micro_batch_size)
from megatron_ext.memory_planner.estimate import expandable_segments_enabled
from megatron_ext.memory_planner.report import attention_kind, plan_report
from megatron_ext.training.dp_reduction import distributed_optimizer_in_use


def parallel_layout(job) -> ParallelLayout:
    """The memory planner's ParallelLayout of a :class:`JobConfig`."""
    r, t = job.recompute, job.training
    return ParallelLayout(
        tp=job.tp, pp=job.pp, dp=job.data_parallel_size, cp=job.cp,
        sequence_parallel=job.parallel.sequence_parallel, micro_batch_size=t.micro_batch_size,
        num_microbatches=job.num_microbatches,
        recompute_granularity=r.recompute_granularity,
        recompute_method=r.recompute_method or "uniform",
        recompute_num_layers=r.recompute_num_layers or 1,
        distributed_optimizer=distributed_optimizer_in_use(job),
        attention=attention_kind(job.attention.attention_backend))


def out_of_memory_advice(job, shape) -> str:
    """What to say when a step ran out of GPU memory: the planner's view and the knobs."""
    layout, mem = parallel_layout(job), job.memory
    kw, budget = mem.estimate_kwargs(), mem.gpu_memory_bytes
    est = estimate_memory(shape, layout, **kw)
    tips = []
    if job.recompute.recompute_granularity != "full":
        tips.append("--recompute-granularity full")
    if job.training.micro_batch_size > 1:
        tips.append("a smaller --micro-batch-size")
    if layout.attention == "local":
        tips.append("--attention-backend auto (flash/SDPA: no s x s scores)")
    if job.tp > 1 and not job.parallel.sequence_parallel:
        tips.append("--sequence-parallel")
    tips.append("more --tensor-model-parallel-size / --context-parallel-size")
    if not layout.distributed_optimizer and job.data_parallel_size > 1:
        tips.append("--use-distributed-optimizer")
    return (f"the planner predicts {est.total / GIB:.1f} GiB per GPU for this configuration "
            f"(longest sequence that fits {mem.gpu_memory_gb:g} GiB: "
            f"{longest_sequence(shape, layout, budget, **kw)} tokens); try "
            + ", ".join(tips) + " (python -m megatron_ext.memory_planner ... compares them)")


def print_memory_plan(job, vocab_size=None) -> None:
    """``--plan-memory``: the memory planner's report of this job (the same text as
    ``python -m megatron_ext.memory_planner`` with the same flags), then the verdict.
    ``vocab_size``: the tokenizer's (default: build the job's tokenizer)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if vocab_size is None:
        from megatron_ext.data.tokenizer import build_tokenizer

        vocab_size = build_tokenizer(job.data).vocab_size
    shape, layout, mem = job.model_shape(vocab_size), parallel_layout(job), job.memory
    kw, budget = mem.estimate_kwargs(), mem.gpu_memory_bytes
    est = estimate_memory(shape, layout, **kw)
    slack = ("expandable segments: no block slack" if expandable_segments_enabled()
             else "fragmentation includes one largest block; set PYTORCH_CUDA_ALLOC_CONF="
                  "expandable_segments:True to reduce it")
    print(f"> memory plan (per GPU, {mem.gpu_memory_gb:g} GiB budget; {slack}):")
    print(plan_report(shape, layout, mem))
    verdict = "fits" if est.total <= budget else "DOES NOT FIT"
    print(f"> predicted peak of the requested layout {est.total / GIB:.2f} GiB: {verdict}")
    print(f"> largest micro-batch that fits: {max_micro_batch_size(shape, layout, budget, **kw)}")
    print(f"> longest sequence that fits: {longest_sequence(shape, layout, budget, **kw)} tokens")
