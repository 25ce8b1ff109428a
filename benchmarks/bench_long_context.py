"""Benchmark: long-context training throughput / MFU / peak memory of a ~1B GPT (GPU only).

Usage:
    python benchmarks/bench_long_context.py [--seq-lengths 4096,8192,...]
        [--recompute none,selective,full]
        [--attention-backend auto] [--layers 16 --hidden 2048 --heads 16 --ffn 8192]
        [--global-tokens 524288] [--memory-cap-gb 80] [--sdpa-priority cudnn,flash,efficient]
        [--steps 3 --warmup 1] [--out long_context.json] [--jsonl rows.jsonl]

One GPU, one process (torch.distributed with world size 1). For each recompute mode and each
sequence length (doubling from 4k until a step runs out of memory or --max-seq-length), it
builds the product's model: the flags become pretrain_gpt.py's (`product_flags`: no biases,
untied output layer, --vocab rows unpadded, --bf16 on GPU, --recompute-granularity),
parsed into a JobConfig (`parse_job`), and `build_gpt` / `build_optimizer` build
megatron-core's GPTModel with our layer spec (SPNorm, flash/SDPA core attention, RoPE),
``Float16Module``, Megatron's DDP and mixed-precision Adam (fp32 main params), after one
`initialize_megatron`. It times training steps as the loop runs them (megatron's
forward/backward schedule over a real global batch of about --global-tokens tokens, i.e.
gradient accumulation over global_tokens / (seq x micro-batch) micro-batches, with the
product's per-token `loss_func`, finalize, then one optimizer step, so the optimizer is
amortised as in training; median of --steps after --warmup, CUDA events around the
forward/backward and the optimizer separately) and records tokens/s, model TFLOP/s, MFU
against --peak-tflops (H100/H200 SXM bf16 dense: 989), the optimizer's share of the step,
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``. One JSON line per row is
printed (and appended to --jsonl) as it is measured; a markdown table and a JSON file follow.

``--memory-cap-gb G`` makes a larger GPU answer "does it fit on a G GB card?": PyTorch's
caching allocator is capped (``torch.cuda.set_per_process_memory_fraction``) at G GiB minus
the device memory this process already holds outside the allocator (CUDA context, library
workspaces), which the smaller card would have to hold too. SDPA may pick cuDNN attention
besides the flash and memory-efficient kernels; ``--sdpa-priority`` sets the order tried.

Model FLOPs come from `megatron_ext.cost_model.ModelShape.flops_per_sample` (Megatron-LM's
count: no recompute, causal attention counts half the scores, training = 3 x forward;
Narayanan et al. 2021 https://arxiv.org/abs/2104.04473) of the job's shape
(`JobConfig.model_shape`); the same shape and the job's layout (`memory_report.parallel_layout`)
give the memory planner's prediction.

On a machine without CUDA it prints a message and exits 0 (``--cpu-smoke`` instead runs a tiny
model on CPU through the same code, to check the script itself).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

RECOMPUTE_MODES = ("none", "selective", "full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lengths", default="", help="comma list; default 4096 doubling")
    p.add_argument("--max-seq-length", type=int, default=262144)
    p.add_argument("--recompute", default="none,selective,full")
    p.add_argument("--attention-backend", default="auto",
                   choices=("auto", "flash", "sdpa", "local"))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--query-groups", type=int, default=None, help="GQA groups (default: heads)")
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--vocab", type=int, default=50304, help="embedding rows (not padded further)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-tokens", type=int, default=524288,
                   help="tokens per optimizer step (gradient accumulation); >= one micro-batch")
    p.add_argument("--memory-cap-gb", type=float, default=0.0,
                   help="cap the allocator as if the GPU had this many GiB (0: no cap)")
    p.add_argument("--sdpa-priority", default="",
                   help="SDPA backend order, e.g. cudnn,flash,efficient (default: PyTorch's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default="long_context.json")
    p.add_argument("--jsonl", default="", help="append each row as one JSON line to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 64, 4, 256, 512
        args.steps, args.warmup = 1, 1
        args.seq_lengths = args.seq_lengths or "64,128"
        args.global_tokens = min(args.global_tokens, 256)
    return args


def product_flags(args, seq: int, recompute: str) -> list:
    """One (sequence length, recompute mode) of the sweep as pretrain_gpt.py's command line."""
    valued = {"--num-layers": args.layers, "--hidden-size": args.hidden,
              "--num-attention-heads": args.heads, "--num-query-groups": args.query_groups,
              "--ffn-hidden-size": args.ffn, "--seq-length": seq,
              "--micro-batch-size": args.micro_batch_size,
              "--global-batch-size": global_batch(args, seq),
              "--make-vocab-size-divisible-by": 1,
              "--attention-backend": args.attention_backend,
              "--recompute-granularity": None if recompute == "none" else recompute}
    switches = {"--disable-bias-linear": True, "--untie-embeddings-and-output-weights": True,
                "--swiglu": args.swiglu, "--bf16": not args.cpu_smoke}
    return ([str(x) for flag, v in valued.items() if v is not None for x in (flag, v)]
            + [flag for flag, on in switches.items() if on])


def global_batch(args, seq: int) -> int:
    """Sequences per optimizer step: about --global-tokens tokens, whole micro-batches."""
    micro = args.micro_batch_size
    return micro * max(1, args.global_tokens // (seq * micro))


def sweep_jobs(args) -> dict:
    """recompute mode -> the JobConfig of each sequence length (all validated up front)."""
    from megatron_ext.training.job import parse_job

    modes = args.recompute.split(",")
    for recompute in modes:
        if recompute not in RECOMPUTE_MODES:
            raise SystemExit(f"--recompute {recompute!r}: choose from {', '.join(RECOMPUTE_MODES)}")
    return {r: [parse_job(product_flags(args, seq, r), world_size=1) for seq in seq_lengths(args)]
            for r in modes}


def measure(args, job, device) -> dict:
    """Build the job's model and optimizer with the product's builders and time its steps."""
    from megatron.core.num_microbatches_calculator import reconfigure_num_microbatches_calculator
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.training.data import loss_func
    from megatron_ext.training.model import build_gpt, build_optimizer

    seq, mbs, M = job.model.seq_length, job.training.micro_batch_size, job.num_microbatches
    reconfigure_num_microbatches_calculator(0, None, job.training.global_batch_size, mbs, 1)
    recompute = job.recompute.recompute_granularity or "none"
    shape = job.model_shape(args.vocab)
    built = build_gpt(job, shape.padded_vocab(job.tp))
    optimizer = build_optimizer(job, built.config, built.ddp)
    tokens = torch.randint(0, args.vocab, (mbs, seq + 1), device=device)  # [b, s + 1]
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, -1)
    loss = partial(loss_func, torch.ones(mbs, seq, device=device))
    forward_backward = get_forward_backward_func()
    timer = _StepTimer(device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch[:, :-1], pos, None, labels=batch[:, 1:]), loss

    def train_step():  # session.run_step's order: M micro-batches, then one optimizer step
        timer.mark()
        built.ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter([tokens] * M),
                         model=[built.ddp], num_microbatches=M, seq_length=seq,
                         micro_batch_size=mbs, forward_only=False)
        timer.mark()
        optimizer.step()
        timer.mark()

    for _ in range(args.warmup):
        train_step()
    timer.done()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fb, opt = [], []
    for _ in range(args.steps):
        train_step()
        t = timer.done()  # [fwd/bwd, optimizer] seconds
        fb.append(t[0])
        opt.append(t[1])
    step_s = statistics.median(a + b for a, b in zip(fb, opt))
    tok_s = M * mbs * seq / step_s
    tflops = tok_s / seq * shape.flops_per_sample(job.tp) / 1e12
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    return dict(seq_length=seq, recompute=recompute, micro_batches=M,
                global_tokens=M * mbs * seq,
                params=sum(p.numel() for p in built.gpt.parameters()), step_s=step_s,
                optimizer_s=statistics.median(opt), optimizer_share=statistics.median(opt) / step_s,
                tokens_per_s=tok_s, model_tflops=tflops, mfu=tflops / args.peak_tflops,
                peak_mem_gib=peak / 2**30, peak_reserved_gib=reserved / 2**30,
                planned_mem_gib=planned_peak_gib(job, shape), status="ok")


class _StepTimer:
    """Intervals between successive `mark()`s: CUDA events on a GPU (read once per step by
    `done()`, so timing never synchronises inside the step), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def done(self):
        """Seconds between marks of the last step (two intervals), then forget the marks."""
        m, self.marks = self.marks[-3:], []
        if len(m) < 3:
            return [0.0, 0.0]
        if self.cuda:
            m[-1].synchronize()
            return [m[i].elapsed_time(m[i + 1]) / 1e3 for i in range(2)]
        return [m[i + 1] - m[i] for i in range(2)]


def cap_memory(gib: float) -> dict:
    """Cap PyTorch's allocator so this GPU behaves like one with `gib` GiB (see the module
    docstring); returns what was set, for the JSON."""
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()  # context, workspaces, others
    limit = gib * 2**30 - outside
    if limit <= 0 or gib * 2**30 > total:
        raise SystemExit(f"--memory-cap-gb {gib}: this GPU has {total / 2**30:.1f} GiB; "
                         f"choose a cap below that")
    torch.cuda.set_per_process_memory_fraction(limit / total)
    return dict(memory_cap_gib=gib, allocator_limit_gib=limit / 2**30,
                outside_allocator_gib=outside / 2**30, device_total_gib=total / 2**30)


def planned_peak_gib(job, shape) -> float:
    """The memory planner's prediction for this run, comparable to max_memory_allocated
    (no CUDA-context overhead, no fragmentation factor): issue 4's 10% target."""
    from megatron_ext.memory_planner import estimate_memory
    from megatron_ext.training.memory_report import parallel_layout

    est = estimate_memory(shape, parallel_layout(job), overhead_bytes=0, fragmentation=1.0,
                          block_slack=False)
    return est.total / 2**30


def seq_lengths(args):
    if args.seq_lengths:
        return [int(s) for s in args.seq_lengths.split(",")]
    out, s = [], 4096
    while s <= args.max_seq_length:
        out.append(s)
        s *= 2
    return out


def markdown(rows) -> str:
    lines = ["| recompute | seq | micro-batches | tokens/s | model TFLOP/s | MFU | optimizer share "
             "| peak mem (GiB) | planner (GiB) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['recompute']} | {r['seq_length']} | {r['micro_batches']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | "
                         f"{100 * r['mfu']:.1f}% | {100 * r['optimizer_share']:.1f}% | "
                         f"{r['peak_mem_gib']:.1f} | {r['planned_mem_gib']:.1f} | ok |")
        else:
            lines.append(f"| {r['recompute']} | {r['seq_length']} | | | | | | | | {r['status']} |")
    return "\n".join(lines)


def emit(row: dict, jsonl: str = "") -> None:
    """One measured row as one JSON line, now (a run killed later keeps it)."""
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
        print("bench_long_context: needs a CUDA GPU (--cpu-smoke checks the script); skipping.")
        return 0
    from megatron_ext.model.attention import get_core_attention, set_sdpa_priority
    from megatron_ext.training.initialize import initialize_megatron
    from megatron_ext.training.job import check_machine

    jobs = sweep_jobs(args)
    first = next(iter(jobs.values()))[0]  # the sweep shares seeds, batch and parallel layout
    check_machine(first)
    device = torch.device(initialize_megatron(first))
    desc = get_core_attention(first.attention)[1]  # the choice build_gpt makes for every job
    set_sdpa_priority(args.sdpa_priority.split(","))
    cap = cap_memory(args.memory_cap_gb) if args.memory_cap_gb and device.type == "cuda" else {}
    print(f"core attention: {desc}; SDPA order: {args.sdpa_priority or 'PyTorch default'}; "
          f"memory cap: {cap or 'none'}", flush=True)
    rows = []
    for recompute, sweep in jobs.items():
        for job in sweep:
            try:
                row = measure(args, job, device)
            except torch.cuda.OutOfMemoryError:
                row = dict(seq_length=job.model.seq_length, recompute=recompute, status="OOM")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row.update(stage="long_context", **cap)
            rows.append(row)
            emit(row, args.jsonl)
            if row["status"] != "ok":
                break  # longer sequences will not fit either
    table = markdown(rows)
    print(f"\n{args.layers} layers, h={args.hidden}, {args.heads} heads, ffn={args.ffn}, "
          f"micro-batch {args.micro_batch_size}, {desc}\n\n{table}")
    with open(args.out, "w") as f:
        flags = {r: product_flags(args, first.model.seq_length, r) for r in jobs}  # first seq
        json.dump(dict(config=vars(args), product_flags=flags, core_attention=desc,
                       memory_cap=cap, rows=rows), f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.exit(main())
