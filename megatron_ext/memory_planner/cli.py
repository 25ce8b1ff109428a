"""Command line of the memory planner: `python -m megatron_ext.memory_planner ...`.

Main API: `main(argv=None)` and `parse_inputs(argv) -> (ModelShape, ParallelLayout,
MemoryPlannerConfig)`. Model/parallel flags use Megatron's names and megatron_ext's training
defaults (dropout 0), so a training command line can be pasted (unknown flags are ignored with
a note) and gives the numbers `--plan-memory` prints for it (both print `report.plan_report`).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from ..cost_model import ModelShape, add_model_shape_args
from .config import MemoryPlannerConfig, add_memory_planner_args
from .report import attention_kind, plan_report
from .shapes import ParallelLayout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.memory_planner",
        description="Predict the peak GPU memory of megatron-core GPT training "
                    "(Korthikanti et al. 2022 activation model).")
    m = add_model_shape_args(p)  # Megatron's model flags, read by ModelShape.from_megatron_args
    m.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="as in training (megatron_ext's default 0; Megatron-LM's 0.1)")
    m.add_argument("--attention-dropout", type=float, default=0.0,
                   help="as in training (megatron_ext's default 0; Megatron-LM's 0.1)")
    m.add_argument("--no-dropout", action="store_true",
                   help="hidden/attention dropout 0 whatever the two flags above say")
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
    par.add_argument("--attention-backend", default="auto",
                     help="auto/flash/sdpa/fused (scores not stored) or local/unfused")
    add_memory_planner_args(p)
    return p


def parse_inputs(argv: Optional[List[str]] = None):
    """(ModelShape, ParallelLayout, MemoryPlannerConfig) of a command line; a usage error
    (one line, exit 2) for a bad shape or layout."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"note: ignoring flags the planner does not model: {' '.join(unknown)}")
    try:
        cfg = MemoryPlannerConfig.from_args(args)
        model = ModelShape.from_megatron_args(args)
        return model, _layout(parser, args), cfg
    except ValueError as e:
        parser.error(str(e))


def _layout(parser, args) -> ParallelLayout:
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
    return ParallelLayout(
        tp=tp, pp=pp, dp=dp, cp=cp, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=gbs // (args.micro_batch_size * dp),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distributed_optimizer=args.use_distributed_optimizer,
        attention=attention_kind(args.attention_backend))


def main(argv: Optional[List[str]] = None) -> int:
    model, layout, cfg = parse_inputs(argv)
    print(plan_report(model, layout, cfg))
    return 0
