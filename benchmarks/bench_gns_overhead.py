"""Benchmark: step-time overhead of per-sample GNS measurement (GPU only).

Usage:
    python benchmarks/bench_gns_overhead.py [--layers 16 --hidden 2048 --heads 16 --ffn 8192]
        [--seq-length 8192] [--micro-batch-size 1 --micro-batches 2]
        [--attention-backend auto] [--steps 10 --warmup 3] [--out gns_overhead.json]

One GPU, one process. Builds one bf16 GPTModel (Megatron DDP + mixed-precision Adam) whose
layer spec uses the GNS layers (`megatron_ext.gns.layers`), and times full training steps
(forward/backward over --micro-batches micro-batches via Megatron's schedule, finalize,
optimizer) alternately with the tracker measuring ("on": fused wgrad + per-sample-norm
kernel, norm/bias per-sample grads, end_step reductions) and not measuring ("off": the very
same modules run megatron-core's own code path). Alternating on/off steps in one run keeps
clocks, allocator state and data identical. Reports median step times and on/off
(target <= 1.02), plus peak memory of each mode.

Without CUDA it prints a message and exits 0 (`--cpu-smoke` runs a tiny model on CPU
through the same code, to check the script itself).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=2,
                   help="per step; the per-sample estimator needs >= 2 samples per step")
    p.add_argument("--add-bias-linear", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "flash", "sdpa", "local"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (autotune)")
    p.add_argument("--out", default="gns_overhead.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (checks the script)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 64, 4, 256, 512
        args.seq_length, args.steps, args.warmup = 64, 2, 1
    if args.micro_batches * args.micro_batch_size < 2:
        p.error("need micro-batches * micro-batch-size >= 2 (per-sample estimator)")
    return args


def init_single_process(cpu: bool):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def build(args, core_attention):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.gns import GNSConfig
    from megatron_ext.gns.layers import gns_layer_spec_kwargs
    from megatron_ext.gns.tracker import GNSTracker
    from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec

    bf16 = not args.cpu_smoke
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn, add_bias_linear=args.add_bias_linear, bf16=bf16,
        params_dtype=dtype, pipeline_dtype=dtype, attention_dropout=0.0, hidden_dropout=0.0,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=args.cpu_smoke)
    kw = gns_layer_spec_kwargs()
    spec = get_gpt_block_spec(cfg, get_gpt_layer_spec(core_attention=core_attention, **kw),
                              norm=kw["norm"])
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq_length, position_embedding_type="rope")
    if bf16:
        model = Float16Module(cfg, model)
    ddp = DDP(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=bf16,
                                                 params_dtype=dtype, clip_grad=1.0), [ddp])
    tracker = GNSTracker(GNSConfig(gns=True), [ddp])
    cfg.finalize_model_grads_func = tracker.wrap_finalize_model_grads(finalize_model_grads)
    return ddp, opt, tracker


def make_step(args, ddp, opt, tracker, device):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    M, b, s = args.micro_batches, args.micro_batch_size, args.seq_length
    data = torch.randint(0, args.vocab, (M, b, s + 1), device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    fb = get_forward_backward_func()

    def fwd(it, model):
        batch = next(it)
        out = model(batch[:, :-1], pos, None, labels=batch[:, 1:])  # [b, s] per-token losses

        def loss_fn(t):
            loss = t.float().mean()
            return loss, {"lm loss": loss.detach()}
        return out, loss_fn

    def step(measure: bool):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        if measure:
            tracker.begin_step(M, b)
        fb(forward_step_func=fwd, data_iterator=iter(list(data)), model=[ddp],
           num_microbatches=M, seq_length=s, micro_batch_size=b, forward_only=False)
        m = tracker.end_step(tokens=M * b * s) if measure else None
        opt.step()
        return m

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_gns_overhead: needs a CUDA GPU (--cpu-smoke checks the script); skipping.")
        return 0
    if args.cpu_smoke:
        from megatron_ext.cpu_backend import enable_cpu_backend

        enable_cpu_backend()
    init_single_process(cpu=args.cpu_smoke)
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    from megatron_ext.kernels import kernel_backend
    from megatron_ext.model.attention import get_core_attention
    from megatron_ext.model.attention_config import AttentionConfig

    init_num_microbatches_calculator(0, None, args.micro_batches * args.micro_batch_size,
                                     args.micro_batch_size, 1)
    core_attention, desc = get_core_attention(AttentionConfig(attention_backend=args.attention_backend))
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    ddp, opt, tracker = build(args, core_attention)
    step = make_step(args, ddp, opt, tracker, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"core attention: {desc}; wgrad kernel backend: "
          f"{kernel_backend(torch.empty(0, device=device))}", flush=True)
    for _ in range(args.warmup):  # Triton autotuning happens in the first "on" steps
        step(False)
        step(True)
    sync()
    times = {False: [], True: []}
    peak = {False: 0, True: 0}
    last = None
    for i in range(2 * args.steps):
        measure = (i % 2 == 1) if (i // 2) % 2 == 0 else (i % 2 == 0)  # ABBA order
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m = step(measure)
        sync()
        times[measure].append(time.perf_counter() - t0)
        if cuda:
            peak[measure] = max(peak[measure], torch.cuda.max_memory_allocated())
        last = m or last
    off, on = statistics.median(times[False]), statistics.median(times[True])
    res = dict(config=vars(args), core_attention=desc, step_s_off=off, step_s_on=on,
               ratio_on_off=on / off, peak_mem_gib_off=peak[False] / 2**30,
               peak_mem_gib_on=peak[True] / 2**30, times_off=times[False], times_on=times[True],
               last_measurement=last.to_dict() if last is not None else None)
    print(f"{args.layers} layers h={args.hidden} seq={args.seq_length} mbs={args.micro_batch_size}"
          f" M={args.micro_batches}: step off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms, "
          f"on/off = {on / off:.4f} (target <= 1.02); peak mem off "
          f"{peak[False] / 2**30:.2f} GiB, on {peak[True] / 2**30:.2f} GiB")
    # Derived, not measured: with --gns-measure-interval N one step in N pays the overhead.
    res["derived_ratio_by_measure_interval"] = {n: 1 + (on / off - 1) / n for n in (2, 4, 8)}
    print("derived from the measured ratio, --gns-measure-interval N: " + ", ".join(
        f"N={n}: {r:.4f}" for n, r in res["derived_ratio_by_measure_interval"].items()))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.exit(main())
