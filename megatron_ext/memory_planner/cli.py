"""Command line of the memory planner: `python -m megatron_ext.memory_planner ...`.

Main API: `main(argv=None)`. Model/parallel flags use Megatron's names so a training command
line can be pasted (unknown flags are ignored with a note).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import List, Optional

from ..cost_model import ModelShape, add_model_shape_args
from .config import MemoryPlannerConfig, add_memory_planner_args
from .estimate import GIB, estimate_memory, expandable_segments_enabled
from .search import best_config, longest_sequence, max_micro_batch_size, relative_cost
from .shapes import ParallelLayout

# Megatron --attention-backend values that materialise the scores.
_LOCAL_BACKENDS = ("local", "unfused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.memory_planner",
        description="Predict the peak GPU memory of megatron-core GPT training "
                    "(Korthikanti et al. 2022 activation model).")
    m = add_model_shape_args(p)  # Megatron's model flags, read by ModelShape.from_megatron_args
    m.add_argument("--no-dropout", action="store_true",
                   help="hidden/attention dropout 0 (no dropout masks)")
    par = p.add_argument_group("parallelism and recompute (Megatron flag names)")
    par.add_argument("--micro-batch-size", type=int, default=1)
    par.add_argument("--global-batch-size", type=int, default=None)
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--world-size", type=int, default=None,
                     help="GPUs in total (default tp*pp*cp, i.e. dp=1)")
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--recompute-granularity", choices=("selective", "full"), default=None)
    par.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    par.add_argument("--recompute-num-layers", type=int, default=1)
    par.add_argument("--attention-backend", default="flash",
                     help="flash/fused/auto (scores not stored) or local/unfused")
    add_memory_planner_args(p)
    return p


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _describe(layout: ParallelLayout) -> str:
    rec = layout.recompute_granularity or "none"
    if rec == "full":
        rec += f"/{layout.recompute_method}/{layout.recompute_num_layers}"
    return (f"tp={layout.tp} pp={layout.pp} cp={layout.cp} dp={layout.dp} "
            f"sp={int(layout.sp)} mbs={layout.micro_batch_size} m={layout.num_microbatches} "
            f"recompute={rec} dist-opt={int(layout.distributed_optimizer)}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"note: ignoring flags the planner does not model: {' '.join(unknown)}")
    cfg = MemoryPlannerConfig.from_args(args)
    kw, cap = cfg.estimate_kwargs(), cfg.gpu_memory_bytes
    try:
        model = ModelShape.from_megatron_args(args)
    except ValueError as e:
        parser.error(str(e))
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    world = args.world_size or tp * pp * cp
    if world % (tp * pp * cp):
        parser.error(f"--world-size {world} is not divisible by tp*pp*cp = {tp * pp * cp}")
    dp = world // (tp * pp * cp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        parser.error(f"--global-batch-size {gbs} is not divisible by micro-batch*dp = "
                     f"{args.micro_batch_size * dp}")
    layout = ParallelLayout(
        tp=tp, pp=pp, dp=dp, cp=cp, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=gbs // (args.micro_batch_size * dp),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distributed_optimizer=args.use_distributed_optimizer,
        attention="local" if args.attention_backend in _LOCAL_BACKENDS else "flash")

    print(f"model: {model.num_params(tp) / 1e9:.3f}B params, "
          f"{model.flops_per_sample(tp) / 1e12:.1f} TFLOP/sample (fwd+bwd), "
          f"{model.num_layers} layers, h={model.hidden_size}, "
          f"heads={model.num_attention_heads}/{model.num_query_groups} groups, "
          f"s={model.seq_length}, vocab={model.padded_vocab(tp)} (padded), "
          f"attention={layout.attention}")
    print(f"GPU memory {cfg.gpu_memory_gb:g} GiB, overhead {cfg.memory_overhead_gb:g} GiB, "
          f"fragmentation x{cfg.memory_fragmentation:g} or one largest transient block "
          f"({'off: expandable segments' if expandable_segments_enabled() else 'on'})\n")
    for gran in (None, "selective", "full"):
        lay = replace(layout, recompute_granularity=gran)
        est = estimate_memory(model, lay, **kw)
        mark = "fits" if est.total <= cap else "DOES NOT FIT"
        chosen = " (requested)" if gran == layout.recompute_granularity else ""
        print(f"[{_describe(lay)}]{chosen}: {_gib(est.total)} -> {mark}")
        print(est.as_table())
        print(f"  max micro-batch: {max_micro_batch_size(model, lay, cap, **kw)}, "
              f"longest sequence: {longest_sequence(model, lay, cap, **kw)} tokens, "
              f"relative cost {relative_cost(model, lay):.3f}\n")

    ranked = best_config(model, world, cap, gbs, **kw)
    if not ranked:
        print(f"no layout of {world} GPU(s) fits in {cfg.gpu_memory_gb:g} GiB at "
              f"s={model.seq_length}, global batch {gbs}: add GPUs (--world-size) or "
              "context parallelism, or shorten the sequence")
        return 0
    print(f"fastest fitting layouts on {world} GPU(s), global batch {gbs}:")
    for lay, est, cost in ranked[:5]:
        print(f"  cost {cost:.3f}  peak {_gib(est.total):>10}  {_describe(lay)}")
    return 0
