"""Benchmark: long-context training throughput / MFU / peak memory of a ~1B GPT (GPU only).

Usage:
    python benchmarks/bench_long_context.py [--seq-lengths 4096,8192,...]
        [--recompute none,selective,full]
        [--attention-backend auto] [--layers 16 --hidden 2048 --heads 16 --ffn 8192]
        [--steps 5 --warmup 2] [--out long_context.json]

One GPU, one process (torch.distributed with world size 1). For each recompute mode and each
sequence length (doubling from 4k until a step runs out of memory or --max-seq-length), it
builds megatron-core's GPTModel with our layer spec (SPNorm, flash/SDPA core attention, RoPE),
in bf16 (``Float16Module``) with Megatron's DDP and mixed-precision Adam (fp32 main params),
times forward + backward + optimizer steps (micro-batch --micro-batch-size, median of --steps
after --warmup) and records tokens/s, model TFLOP/s, MFU against --peak-tflops (H100 SXM bf16
dense: 989) and ``torch.cuda.max_memory_allocated``. Prints a markdown table and writes JSON.

Model FLOPs per token (no recompute counted, causal attention counts half the scores; the
usual "3 x forward" for training, Narayanan et al. 2021 https://arxiv.org/abs/2104.04473):
    forward = L * (2h(h_q + 2 h_kv) + 2 h_q h + 2 s h_q + 2 n_mlp h f) + 2 h V
with h_q = heads * hn, h_kv = groups * hn, n_mlp = 2 (GELU) or 3 (SwiGLU).

On a machine without CUDA it prints a message and exits 0 (``--cpu-smoke`` instead runs a tiny
model on CPU through the same code, to check the script itself).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time

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
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default="long_context.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 64, 4, 256, 512
        args.steps, args.warmup = 1, 1
        args.seq_lengths = args.seq_lengths or "64,128"
    return args


def flops_per_token(args, seq: int) -> float:
    """Model (not hardware) training FLOPs per token, see the module docstring."""
    hn = args.hidden // args.heads
    h_q, h_kv = args.heads * hn, (args.query_groups or args.heads) * hn
    n_mlp = 3 if args.swiglu else 2
    layer = (
        2 * args.hidden * (h_q + 2 * h_kv)  # QKV projection
        + 2 * h_q * args.hidden  # output projection
        + 2 * seq * h_q  # QK^T and PV: 2 * 2 * s * h_q halved by the causal mask
        + 2 * n_mlp * args.hidden * args.ffn  # MLP
    )
    return 3.0 * (args.layers * layer + 2 * args.hidden * args.vocab)


def init_single_process(cpu: bool):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def build(args, seq: int, recompute: str, core_attention):
    """GPTModel (bf16 on GPU) wrapped in Megatron DDP, and its mixed-precision optimizer."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec

    bf16 = not args.cpu_smoke
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.query_groups, ffn_hidden_size=args.ffn,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, use_cpu_initialization=args.cpu_smoke,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )
    spec = get_gpt_block_spec(cfg, get_gpt_layer_spec(core_attention=core_attention))
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=seq, position_embedding_type="rope")
    if bf16:
        model = Float16Module(cfg, model)
    ddp = DDP(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, params_dtype=cfg.params_dtype,
                        clip_grad=1.0),
        [ddp],
    )
    n_params = sum(p.numel() for p in model.parameters())
    return ddp, opt, n_params


def train_step(ddp, opt, tokens, pos):
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    opt.zero_grad()
    losses = ddp(tokens[:, :-1], pos, None, labels=tokens[:, 1:])  # [b, s] per-token losses
    losses.float().mean().backward()
    finalize_model_grads([ddp])
    opt.step()


def measure(args, seq: int, recompute: str, core_attention, device) -> dict:
    ddp, opt, n_params = build(args, seq, recompute, core_attention)
    tokens = torch.randint(0, args.vocab, (args.micro_batch_size, seq + 1), device=device)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        train_step(ddp, opt, tokens, pos)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(ddp, opt, tokens, pos)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_s = args.micro_batch_size * seq / step_s
    tflops = tok_s * flops_per_token(args, seq) / 1e12
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return dict(seq_length=seq, recompute=recompute, params=n_params, step_s=step_s,
                tokens_per_s=tok_s, model_tflops=tflops, mfu=tflops / args.peak_tflops,
                peak_mem_gib=peak / 2**30, planned_mem_gib=planned_peak_gib(args, seq, recompute),
                status="ok")


def planned_peak_gib(args, seq: int, recompute: str) -> float:
    """The memory planner's prediction for this run, comparable to max_memory_allocated
    (no CUDA-context overhead, no fragmentation factor): issue 4's 10% target."""
    from megatron_ext.memory_planner import ModelShape, ParallelLayout, estimate_memory

    model = ModelShape(num_layers=args.layers, hidden_size=args.hidden,
                       num_attention_heads=args.heads, seq_length=seq, vocab_size=args.vocab,
                       ffn_hidden_size=args.ffn, num_query_groups=args.query_groups,
                       swiglu=args.swiglu, untie_embeddings=True, dropout=False)
    layout = ParallelLayout(micro_batch_size=args.micro_batch_size,
                            recompute_granularity=None if recompute == "none" else recompute,
                            attention="local" if args.attention_backend == "local" else "flash")
    est = estimate_memory(model, layout, overhead_bytes=0, fragmentation=1.0,
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
    lines = ["| recompute | seq | tokens/s | model TFLOP/s | MFU | peak mem (GiB) "
             "| planner (GiB) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['recompute']} | {r['seq_length']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['model_tflops']:.1f} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_mem_gib']:.1f} | {r['planned_mem_gib']:.1f} | ok |")
        else:
            lines.append(f"| {r['recompute']} | {r['seq_length']} | | | | | | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_long_context: needs a CUDA GPU (--cpu-smoke checks the script); skipping.")
        return 0
    if args.cpu_smoke:
        from megatron_ext.cpu_backend import enable_cpu_backend

        enable_cpu_backend()
    init_single_process(cpu=args.cpu_smoke)
    from megatron_ext.model.attention import get_core_attention
    from megatron_ext.model.attention_config import AttentionConfig

    attn_cfg = AttentionConfig(attention_backend=args.attention_backend)
    core_attention, desc = get_core_attention(attn_cfg)
    if args.cpu_smoke:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"core attention: {desc}", flush=True)
    rows = []
    for recompute in args.recompute.split(","):
        if recompute not in RECOMPUTE_MODES:
            raise SystemExit(f"--recompute {recompute!r}: choose from {', '.join(RECOMPUTE_MODES)}")
        for seq in seq_lengths(args):
            try:
                row = measure(args, seq, recompute, core_attention, device)
            except torch.cuda.OutOfMemoryError:
                row = dict(seq_length=seq, recompute=recompute, status="OOM")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["status"] != "ok":
                break  # longer sequences will not fit either
    table = markdown(rows)
    print(f"\n{args.layers} layers, h={args.hidden}, {args.heads} heads, ffn={args.ffn}, "
          f"micro-batch {args.micro_batch_size}, {desc}\n\n{table}")
    with open(args.out, "w") as f:
        json.dump(dict(config=vars(args), core_attention=desc, rows=rows), f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.exit(main())
