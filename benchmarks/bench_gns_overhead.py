"""Benchmark: step-time overhead of per-sample GNS measurement (GPU only).

Usage:
    python benchmarks/bench_gns_overhead.py [--layers 16 --hidden 2048 --heads 16 --ffn 8192]
        [--seq-length 8192] [--micro-batch-size 1 --micro-batches 2]
        [--attention-backend auto] [--steps 10 --warmup 3] [--out gns_overhead.json]

One GPU, one process. The model is the product's: the flags above become pretrain_gpt.py's
(`product_flags`, no biases unless --add-bias-linear, untied output layer, --vocab rows
unpadded, --bf16 on GPU, --gns), parsed into a JobConfig (`parse_job`) and built like the
training loop builds it: `initialize_megatron`, `GNSComponent` (its layer spec puts the GNS
layers into the model), `build_gpt`, `GNSComponent.attach`, `build_optimizer` (Megatron DDP +
mixed-precision Adam). A step is the loop's (`session.run_step`'s order): megatron's
forward/backward schedule over --micro-batches micro-batches with the product's per-token
`loss_func`, finalize, optimizer. Steps alternate between measuring ("on": the component's
`on_step_start` / `after_backward` hooks run, i.e. fused wgrad + per-sample-norm kernel,
norm/bias per-sample grads, the estimator update) and not measuring ("off": no hooks, so the
very same modules run megatron-core's own code path, as on the unmeasured steps of
--gns-measure-interval). Two measurements, each alternating on/off windows (ABBA order) in one
run, which keeps clocks, allocator state and data identical: every step measured (target
on/off <= 1.10), then windows of N steps whose last step is measured (the component's gating
at --gns-measure-interval N) against N plain steps (target <= 1.02); N is --measure-interval
or, when 0, the smallest N for which the every-step overhead divided by N is <= 2%. One JSON
line per measurement is printed (and appended to --jsonl) as it is measured.

Without CUDA it prints a message and exits 0 (`--cpu-smoke` runs a tiny model on CPU
through the same code, to check the script itself).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50304, help="embedding rows (not padded further)")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=2,
                   help="per step; the per-sample estimator needs >= 2 samples per step")
    p.add_argument("--add-bias-linear", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "flash", "sdpa", "local"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (autotune)")
    p.add_argument("--measure-interval", type=int, default=0,
                   help="--gns-measure-interval to time as well (0: the smallest N whose "
                        "derived overhead is <= 2%%)")
    p.add_argument("--interval-windows", type=int, default=3,
                   help="windows of N steps per mode at the measure interval")
    p.add_argument("--out", default="gns_overhead.json")
    p.add_argument("--jsonl", default="", help="append each row as one JSON line to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 64, 4, 256, 512
        args.seq_length, args.steps, args.warmup = 64, 2, 1
        args.interval_windows = 1
    if args.micro_batches * args.micro_batch_size < 2:
        p.error("need micro-batches * micro-batch-size >= 2 (per-sample estimator)")
    return args


def product_flags(args) -> list:
    """The benchmarked job as pretrain_gpt.py's command line."""
    flags = ["--num-layers", args.layers, "--hidden-size", args.hidden,
             "--num-attention-heads", args.heads, "--ffn-hidden-size", args.ffn,
             "--seq-length", args.seq_length, "--micro-batch-size", args.micro_batch_size,
             "--global-batch-size", args.micro_batches * args.micro_batch_size,
             "--make-vocab-size-divisible-by", 1, "--attention-backend", args.attention_backend,
             "--untie-embeddings-and-output-weights", "--gns"]
    flags += [] if args.add_bias_linear else ["--disable-bias-linear"]
    flags += [] if args.cpu_smoke else ["--bf16"]
    return [str(f) for f in flags]


class Bench:
    """The product's GPT with the GNS component, its optimizer and a train state."""

    def __init__(self, args):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_ext.gns.component import GNSComponent
        from megatron_ext.training.data import loss_func
        from megatron_ext.training.initialize import initialize_megatron
        from megatron_ext.training.job import check_machine, parse_job
        from megatron_ext.training.model import build_gpt, build_optimizer
        from megatron_ext.training.state import TrainState

        self.job = job = parse_job(product_flags(args), world_size=1)
        check_machine(job)
        self.device = torch.device(initialize_megatron(job))
        self.gns = GNSComponent(job.gns)  # first: the model's layer spec carries its recorder
        padded_vocab = job.model_shape(args.vocab).padded_vocab(job.tp)
        self.built = build_gpt(job, padded_vocab, self.gns.model_options())
        self.gns.attach([self.built.ddp], self.built.config)
        self.optimizer = build_optimizer(job, self.built.config, self.built.ddp)
        t = job.training
        self.state = TrainState(job.model.seq_length, t.global_batch_size, t.micro_batch_size,
                                job.data_parallel_size)
        self.forward_backward = get_forward_backward_func()
        M, b, s = job.num_microbatches, t.micro_batch_size, job.model.seq_length
        self.micro_batches = list(torch.randint(0, args.vocab, (M, b, s + 1), device=self.device))
        self.positions = torch.arange(s, device=self.device).unsqueeze(0).expand(b, -1)
        self.loss = partial(loss_func, torch.ones(b, s, device=self.device))  # every token

    def forward_step(self, data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens[:, :-1], self.positions, None, labels=tokens[:, 1:])
        return output, self.loss  # the product's per-token loss (sum and token count)

    def step(self, measure: bool):
        """One optimizer step in the loop's order; the GNS hooks run only when measuring."""
        ddp, state = self.built.ddp, self.state
        ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if measure:
            self.gns.on_step_start(state)
        self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=iter(self.micro_batches),
            model=[ddp], num_microbatches=len(self.micro_batches), seq_length=state.seq_length,
            micro_batch_size=state.micro_batch_size, forward_only=False)
        if measure:
            self.gns.after_backward(state)
        self.optimizer.step()
        state.advance()
        return self.gns.last if measure else None


def recommended_interval(ratio_every_step: float, target: float = 1.02) -> int:
    """Smallest --gns-measure-interval N with 1 + (ratio - 1) / N <= target (1..64): one step
    in N pays the measured every-step overhead."""
    excess = max(ratio_every_step - 1.0, 0.0)
    return int(min(64, max(1, math.ceil(excess / (target - 1.0) - 1e-9))))


def _timed(bench, measures, sync):
    """Seconds for steps with the given measure flags, and the peak memory they reached."""
    if torch.cuda.is_available() and bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    last = None
    for m in measures:
        last = bench.step(m) or last
    sync()
    peak = torch.cuda.max_memory_allocated() if bench.device.type == "cuda" else 0
    return time.perf_counter() - t0, peak, last


def abba(bench, window_on, window_off, rounds, sync):
    """Alternate an "on" window and an "off" window in ABBA order, `rounds` of each; returns
    per-step times of each mode, peak memory of each and the last measurement."""
    times, peak, last = {True: [], False: []}, {True: 0, False: 0}, None
    for i in range(2 * rounds):
        on = (i % 2 == 1) if (i // 2) % 2 == 0 else (i % 2 == 0)
        steps = window_on if on else window_off
        dt, pk, m = _timed(bench, steps, sync)
        times[on].append(dt / len(steps))
        peak[on] = max(peak[on], pk)
        last = m or last
    return times, peak, last


def emit(row, jsonl=""):
    line = json.dumps(row)
    print(line, flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:  # the product builders take the GPU whenever they see one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("bench_gns_overhead: needs a CUDA GPU (--cpu-smoke checks the script); skipping.")
        return 0
    from megatron_ext.kernels import kernel_backend

    bench = Bench(args)
    device = bench.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"core attention: {bench.built.attention}; wgrad kernel backend: "
          f"{kernel_backend(torch.empty(0, device=device))}; {bench.gns.describe()}", flush=True)
    for _ in range(args.warmup):  # Triton autotuning (and route choice) in the first "on" steps
        bench.step(False)
        bench.step(True)
    sync()
    base = dict(stage="gns_overhead", layers=args.layers, hidden=args.hidden,
                seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                micro_batches=args.micro_batches)
    # 1. Every step measured vs none (one step per window).
    times, peak, last = abba(bench, [True], [False], args.steps, sync)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    every = dict(base, measure_interval=1, step_s_off=off, step_s_on=on, ratio_on_off=on / off,
                 target=1.10, peak_mem_gib_off=peak[False] / 2**30,
                 peak_mem_gib_on=peak[True] / 2**30)
    emit(every, args.jsonl)
    # 2. At the measure interval: windows of N steps, the last one measured (the
    # component's gating), against N plain steps.
    n = args.measure_interval or recommended_interval(on / off)
    rows = [every]
    if n > 1:
        t2, peak2, last2 = abba(bench, [False] * (n - 1) + [True], [False] * n,
                                args.interval_windows, sync)
        off2, on2 = statistics.median(t2[False]), statistics.median(t2[True])
        rows.append(dict(base, measure_interval=n,
                         interval_source="flag" if args.measure_interval else
                         "derived: smallest N with every-step overhead / N <= 2%",
                         step_s_off=off2, step_s_on=on2, ratio_on_off=on2 / off2, target=1.02,
                         peak_mem_gib_on=peak2[True] / 2**30))
        emit(rows[-1], args.jsonl)
        last = last2 or last
    for r in rows:
        print(f"{args.layers} layers h={args.hidden} seq={args.seq_length} "
              f"mbs={args.micro_batch_size} M={args.micro_batches} measure interval "
              f"{r['measure_interval']}: step off {r['step_s_off'] * 1e3:.1f} ms, on "
              f"{r['step_s_on'] * 1e3:.1f} ms, on/off = {r['ratio_on_off']:.4f} "
              f"(target <= {r['target']})")
    res = dict(config=vars(args), product_flags=product_flags(args),
               core_attention=bench.built.attention, rows=rows, times_every_step=times,
               last_measurement=last.to_dict() if last is not None else None)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.exit(main())
