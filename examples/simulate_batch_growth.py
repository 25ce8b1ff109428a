#!/usr/bin/env python
"""Simulate dynamic global-batch growth for a GPT model on a cluster (no GPU needed).

Either plans a given path of global batches:
    python examples/simulate_batch_growth.py --model gpt-1.3b \
        --topology nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB \
        --global-batches 256,512,1024,2048
or feeds a synthetic B_simple trajectory (geometric from A to B over --sim-steps steps) to
the BatchController and prints every growth decision:
    python examples/simulate_batch_growth.py --model gpt-1.3b --topology ... \
        --bnoise-path 200:2000 --batch-growth gns --initial-global-batch 256

The model is a megatron_ext.cost_model.ModelShape built from Megatron's model flags (a
--model preset fills layers, width and heads): its FLOPs per sample and parameter count feed
the step-time model, and megatron_ext.memory_planner picks the largest micro-batch that fits
for this sequence length, recompute, attention backend and layout (unless
--max-micro-batch-size is given). The planner then runs each global batch with the split
(micro-batch x accumulation) its step-time model finds fastest; the `split` column is that
split's efficiency against an unconstrained one, and batches below --min-split-efficiency
(e.g. a prime per-rank batch forced to micro-batch 1) are not grown to.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ext.batch_growth import (  # noqa: E402
    BatchController, BatchGrowthConfig, BatchPlanner, add_batch_growth_args, parse_topology)
from megatron_ext.batch_growth.controller import Progress  # noqa: E402
from megatron_ext.cost_model import ModelShape, add_model_shape_args  # noqa: E402
from megatron_ext.batch_growth.step_time import DEFAULT_OVERHEAD_TOKENS  # noqa: E402
from megatron_ext.memory_planner import GIB, ParallelLayout, max_micro_batch_size  # noqa: E402
from megatron_ext.memory_planner.report import attention_kind  # noqa: E402

# GPT-3 paper shapes (Brown et al. 2020) with Megatron head counts.
MODEL_PRESETS = {
    "gpt-125m": (12, 768, 12), "gpt-350m": (24, 1024, 16), "gpt-760m": (24, 1536, 16),
    "gpt-1.3b": (24, 2048, 16), "gpt-2.7b": (32, 2560, 32), "gpt-6.7b": (32, 4096, 32),
    "gpt-13b": (40, 5120, 40),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_args(p, required=False)
    p.set_defaults(seq_length=2048)
    m = p.add_argument_group("preset and layout")
    m.add_argument("--model", choices=sorted(MODEL_PRESETS), default=None,
                   help="fills --num-layers, --hidden-size, --num-attention-heads")
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--pp", type=int, default=1)
    m.add_argument("--dp", type=int, default=None, help="default: all GPUs / (tp*pp)")
    m.add_argument("--max-micro-batch-size", type=int, default=None,
                   help="default: the memory planner's largest micro-batch that fits")
    m.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    m.add_argument("--attention-backend", default="auto",
                   help="local/unfused materialise the s x s scores (memory planner)")
    m.add_argument("--sequence-parallel", action="store_true")
    m.add_argument("--distributed-optimizer", action="store_true")
    m.add_argument("--overhead-tokens", type=float, default=DEFAULT_OVERHEAD_TOKENS,
                   help="per-micro-batch cost in tokens of the efficiency curve (an "
                        "assumption; see megatron_ext/batch_growth/step_time.py)")
    m.add_argument("--min-split-efficiency", type=float, default=0.95,
                   help="do not grow to batches whose best split is slower than this "
                        "fraction of an unconstrained one (0: any runnable batch)")
    s = p.add_argument_group("simulation")
    s.add_argument("--global-batches", type=str, default=None, help="e.g. 256,512,1024")
    s.add_argument("--bnoise-path", type=str, default=None,
                   help="START:END synthetic B_simple trajectory fed to the controller")
    s.add_argument("--sim-steps", type=int, default=20000)
    s.add_argument("--initial-global-batch", type=int, default=None,
                   help="default: the smallest valid batch >= 4*dp")
    add_batch_growth_args(p)
    return p


def model_shape(args) -> ModelShape:
    if args.model:
        l, h, a = MODEL_PRESETS[args.model]
        args.num_layers = args.num_layers or l
        args.hidden_size = args.hidden_size or h
        args.num_attention_heads = args.num_attention_heads or a
    if not (args.num_layers and args.hidden_size and args.num_attention_heads):
        sys.exit("give --model or --num-layers, --hidden-size and --num-attention-heads")
    return ModelShape.from_megatron_args(args)


def max_micro_batch(args, shape: ModelShape, topo, dp):
    """(max micro-batch, where it came from)."""
    if args.max_micro_batch_size:
        return args.max_micro_batch_size, "--max-micro-batch-size"
    layout = ParallelLayout(tp=args.tp, pp=args.pp, dp=dp, num_microbatches=max(1, args.pp),
                            sequence_parallel=args.sequence_parallel,
                            recompute_granularity=args.recompute_granularity,
                            distributed_optimizer=args.distributed_optimizer,
                            attention=attention_kind(args.attention_backend))
    mbs = max_micro_batch_size(shape, layout, int(topo.gpu_memory_gb * GIB), limit=64)
    return mbs, "megatron_ext.memory_planner"


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


HEAD = ["global_batch", "mbs", "accum", "dp", "reduction", "step_s", "tokens/s", "exposed_ms",
        "split"]
WID = [12, 4, 5, 4, 12, 8, 11, 10, 5]


def plan_cols(plan):
    return [plan.global_batch, plan.micro_batch_size, plan.num_microbatches, plan.dp_size,
            plan.reduction, f"{plan.predicted_step_time_s:.3f}",
            f"{plan.predicted_tokens_per_s:,.0f}",
            f"{plan.breakdown['exposed_comm_s'] * 1e3:.1f}", f"{plan.split_efficiency:.2f}"]


def run_path(planner, batches):
    print(fmt_row(HEAD, WID))
    for b in batches:
        try:
            print(fmt_row(plan_cols(planner.plan(b)), WID))
        except ValueError as e:
            print(f"{b:>12}  invalid: {e}")


def run_bnoise(args, planner, cfg, initial):
    try:
        start, end = (float(x) for x in args.bnoise_path.split(":"))
        assert start > 0 and end > 0
    except (ValueError, AssertionError):
        sys.exit(f"--bnoise-path wants START:END with positive numbers, got {args.bnoise_path!r}")
    ctl = BatchController(cfg, initial, planner=planner)
    head = ["step", "Gtokens", "B_simple"] + HEAD + ["reason"]
    wid = [7, 8, 9] + WID + [0]
    print(fmt_row(head, wid))
    samples, tokens, wall, b = 0, 0, 0.0, initial

    def row(step, bs, reason):
        return fmt_row([step, f"{tokens / 1e9:.2f}", f"{bs:.0f}"] + plan_cols(planner.plan(b))
                       + [reason], wid)

    print(row(0, start, "initial"))
    for it in range(1, args.sim_steps + 1):
        frac = (it - 1) / max(1, args.sim_steps - 1)
        bs = start * (end / start) ** frac  # geometric B_simple trajectory
        t = planner.plan(b).predicted_step_time_s
        samples, tokens, wall = samples + b, tokens + b * args.seq_length, wall + t
        new = ctl.step(Progress(it, samples, tokens, b), bs, t)
        if new is not None:
            b = new
            print(row(it, bs, ctl.last_decision.reason))
    print(f"final global batch {b} after {args.sim_steps} steps, {tokens / 1e9:.2f} G tokens, "
          f"{wall / 3600:.2f} h predicted ({len(ctl.history)} growth steps)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        simulate(args)
    except ValueError as e:  # bad --topology, layout or growth flags: message says the fix
        sys.exit(f"error: {e}")


def simulate(args):
    shape = model_shape(args)
    topo = parse_topology(args.topology)
    model_parallel = args.tp * args.pp
    dp = args.dp or topo.num_gpus // model_parallel
    if dp < 1:
        sys.exit(f"tp*pp={model_parallel} exceeds the {topo.num_gpus} GPUs of --topology")
    flops, params = shape.flops_per_sample(args.tp), shape.num_params(args.tp)
    mbs, mbs_src = max_micro_batch(args, shape, topo, dp)
    if mbs < 1:
        sys.exit(f"one sample does not fit in {topo.gpu_memory_gb} GiB per GPU ({mbs_src}); "
                 "add tp/pp or --recompute-granularity")
    planner = BatchPlanner(flops, params, topo, dp_size=dp, tp_size=args.tp, pp_size=args.pp,
                           max_micro_batch_size=mbs, seq_length=args.seq_length,
                           mfu_assumed=args.mfu_assumed,
                           distributed_optimizer=args.distributed_optimizer,
                           overhead_tokens=args.overhead_tokens,
                           min_split_efficiency=args.min_split_efficiency)
    print(f"model: {args.model or 'custom'} l={shape.num_layers} h={shape.hidden_size} "
          f"a={shape.num_attention_heads} groups={shape.num_query_groups} "
          f"s={shape.seq_length} V={shape.padded_vocab(args.tp)}: "
          f"{params / 1e9:.2f} B params, {flops / 1e12:.1f} TFLOP/sample (fwd+bwd)")
    print(f"cluster: {topo.describe()}")
    print(f"layout: dp={dp} tp={args.tp} pp={args.pp}, max micro-batch {mbs} ({mbs_src}), "
          f"MFU assumed {args.mfu_assumed} at large micro-batches")
    print(f"{planner.describe()}; growth skips batches with split efficiency < "
          f"{args.min_split_efficiency:g}")
    if args.global_batches:
        run_path(planner, [int(x) for x in args.global_batches.split(",") if x.strip()])
    if args.bnoise_path:
        initial = args.initial_global_batch or planner.next_valid(4 * dp)
        if args.batch_growth == "off":
            args.batch_growth = "gns"
            print("note: --batch-growth off with --bnoise-path; simulating the gns rule")
        if args.batch_growth_max is None:
            args.batch_growth_max = 16 * initial
        cfg = BatchGrowthConfig.from_args(args)
        print(f"controller: rule={cfg.batch_growth} k={cfg.batch_growth_k} "
              f"threshold={cfg.batch_growth_threshold} interval={cfg.batch_growth_interval} "
              f"min_steps={cfg.batch_growth_min_steps} bounds={cfg.bounds(initial)}")
        run_bnoise(args, planner, cfg, initial)
    if not (args.global_batches or args.bnoise_path):
        run_path(planner, [dp * mbs * 2 ** i for i in range(6)])


if __name__ == "__main__":
    main()
