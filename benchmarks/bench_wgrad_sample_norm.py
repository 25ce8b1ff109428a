"""Benchmark: fused dW + per-sample norms kernel vs cuBLAS dW alone (GPU only).

Usage:
    python benchmarks/bench_wgrad_sample_norm.py [--iters 20] [--warmup 5] [--out res.json]
        [--shapes "8,2048,2048,8192;1,32768,4096,4096"] [--no-naive]

For each (b, s, d_in, d_out), bf16, sequence-first [s, b, h] activations, it times side
by side in one run (CUDA events, median of --iters after --warmup calls, the first of
which also autotunes the kernel):
    cublas      dyᵀx alone as one [s*b]-deep GEMM (no per-sample norms): the target
    fused       wgrad_sample_norms(x, dy): dW + ‖dW_i‖² for every sample (the autotuner
                picks among cp.async and, on Hopper, TMA configs; the table says which won)
    fused_cpa   the same restricted to the cp.async configs (tma=False)
    fused_mg    the same accumulating into an fp32 main_grad (Megatron grad-acc fusion)
    triton_dw   the same kernel with the per-sample epilogue compiled out (dW only): splits
                the gap into Triton-GEMM vs cuBLAS (triton_dw/cublas) and the norms' own
                cost (fused/triton_dw)
    bmm_norm    naive: per-sample dW_i by bmm, then norms and Σ_i dW_i
    ghost       naive "ghost norm" ‖dW_i‖² = ⟨x_i x_iᵀ, dy_i dy_iᵀ⟩ per sample + cuBLAS dW
and prints a markdown table (ratio fused / cublas; the goal is ≤ 1.05). On a machine
without CUDA it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

DEFAULT_SHAPES = [  # (b, s, d_in, d_out)
    (8, 2048, 2048, 8192),
    (8, 4096, 4096, 4096),
    (4, 8192, 2048, 2048),
    (1, 32768, 4096, 4096),
    (16, 1024, 8192, 2048),
]


def _parse_shapes(text):
    if not text:
        return DEFAULT_SHAPES
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]


def _time_ms(fn, warmup, iters):
    """Median wall time of fn() on the current stream in ms (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _safe_time(fn, warmup, iters):
    try:
        return _time_ms(fn, warmup, iters)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _kernel():
    from megatron_ext.kernels import wgrad_sample_norm

    return wgrad_sample_norm._wgrad_sample_norm_kernel


def bench_shape(b, s, d_in, d_out, warmup, iters, naive=True, device="cuda"):
    """One table row; `device` other than cuda only serves a logic smoke test."""
    from megatron_ext.kernels import wgrad_sample_norms

    dev, dt = device, torch.bfloat16
    x = torch.randn(s, b, d_in, device=dev, dtype=dt)  # [s, b, d_in]
    dy = torch.randn(s, b, d_out, device=dev, dtype=dt) / d_out**0.5  # [s, b, d_out]
    x2, dy2 = x.view(s * b, d_in), dy.view(s * b, d_out)
    main_grad = torch.zeros(d_out, d_in, device=dev, dtype=torch.float32)

    def cublas():
        return dy2.t() @ x2  # [d_out, d_in], transposed operand handled by cuBLAS

    def fused():
        return wgrad_sample_norms(x, dy)

    def fused_mg():
        return wgrad_sample_norms(x, dy, main_grad=main_grad)

    def fused_cpa():
        return wgrad_sample_norms(x, dy, tma=False)

    def triton_dw():
        return wgrad_sample_norms(x, dy, compute_norms=False)

    def bmm_norm():
        dw_i = torch.bmm(dy.permute(1, 2, 0), x.permute(1, 0, 2))  # [b, d_out, d_in]
        norms = torch.linalg.vector_norm(dw_i, dim=(1, 2), dtype=torch.float32).square()
        return dw_i.sum(0, dtype=torch.float32), norms

    def ghost():
        xb, gb = x.permute(1, 0, 2), dy.permute(1, 0, 2)  # [b, s, h] views
        norms = torch.stack(
            [((xb[i] @ xb[i].t()).float() * (gb[i] @ gb[i].t()).float()).sum() for i in range(b)]
        )
        return cublas(), norms

    row = {"b": b, "s": s, "d_in": d_in, "d_out": d_out}
    row["cublas_ms"] = _safe_time(cublas, warmup, iters)
    row["fused_ms"] = _safe_time(fused, warmup, iters)
    best = getattr(_kernel(), "best_config", None)
    row["fused_config"] = str(best) if best is not None else None
    row["fused_uses_tma"] = bool(best.kwargs.get("USE_TMA")) if best is not None else None
    row["fused_cp_async_ms"] = _safe_time(fused_cpa, warmup, iters)
    row["fused_main_grad_ms"] = _safe_time(fused_mg, warmup, iters)
    row["triton_dw_ms"] = _safe_time(triton_dw, warmup, iters)
    row["bmm_norm_ms"] = _safe_time(bmm_norm, warmup, iters) if naive else None
    row["ghost_ms"] = _safe_time(ghost, warmup, iters) if naive else None
    if row["cublas_ms"] and row["fused_ms"]:
        row["ratio_fused_vs_cublas"] = row["fused_ms"] / row["cublas_ms"]
        row["fused_tflops"] = 2.0 * s * b * d_in * d_out / (row["fused_ms"] * 1e-3) / 1e12
    if row["triton_dw_ms"] and row["fused_ms"] and row["cublas_ms"]:
        row["ratio_triton_dw_vs_cublas"] = row["triton_dw_ms"] / row["cublas_ms"]
        row["ratio_fused_vs_triton_dw"] = row["fused_ms"] / row["triton_dw_ms"]
    # Accuracy spot check against cuBLAS dW and an fp32 per-sample loop over 2 samples.
    res = fused()
    ref = cublas().float()
    row["dw_max_rel_err"] = ((res.grad_weight.float() - ref).abs().max() / ref.abs().max()).item()
    errs = []
    for i in range(min(b, 2)):
        n_i = (dy[:, i].float().t() @ x[:, i].float()).square().sum()
        errs.append(((res.sq_norms_weight[i] - n_i).abs() / n_i).item())
    row["norm_max_rel_err"] = max(errs)
    return row  # the caller empties the CUDA cache once this shape's tensors are gone


def _ratio(a, b):
    return a / b if a and b else None


def _fmt(v, spec=".3f"):
    return "OOM/skip" if v is None else format(v, spec)


def print_table(rows):
    print(
        "| b | s | d_in | d_out | cuBLAS dW ms | fused ms | fused/cuBLAS | TMA won | cp.async-only/cuBLAS "
        "| fused+main_grad ms "
        "| Triton dW-only/cuBLAS | fused/Triton dW-only "
        "| bmm+norm ms | ghost ms | fused TFLOP/s | dW rel err | norm rel err |"
    )
    print("|" + "---|" * 17)
    for r in rows:
        print(
            f"| {r['b']} | {r['s']} | {r['d_in']} | {r['d_out']} | {_fmt(r['cublas_ms'])} "
            f"| {_fmt(r['fused_ms'])} | {_fmt(r.get('ratio_fused_vs_cublas'))} "
            f"| {'-' if r.get('fused_uses_tma') is None else ('yes' if r['fused_uses_tma'] else 'no')} "
            f"| {_fmt(_ratio(r.get('fused_cp_async_ms'), r.get('cublas_ms')))} "
            f"| {_fmt(r['fused_main_grad_ms'])} | {_fmt(r.get('ratio_triton_dw_vs_cublas'))} "
            f"| {_fmt(r.get('ratio_fused_vs_triton_dw'))} "
            f"| {_fmt(r['bmm_norm_ms'])} | {_fmt(r['ghost_ms'])} "
            f"| {_fmt(r.get('fused_tflops'), '.0f')} | {_fmt(r['dw_max_rel_err'], '.1e')} "
            f"| {_fmt(r['norm_max_rel_err'], '.1e')} |"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shapes", type=str, default="", help='"b,s,d_in,d_out;..." (default: the 5 reference shapes)')
    p.add_argument("--no-naive", action="store_true", help="skip the bmm / ghost-norm baselines")
    p.add_argument("--out", type=str, default="", help="write the rows as JSON to this path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_wgrad_sample_norm: no CUDA device, nothing to benchmark (the kernel needs a GPU).")
        return 0
    from megatron_ext.kernels import kernel_backend

    probe = torch.zeros(1, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}  backend: {kernel_backend(probe)}  torch {torch.__version__}")
    rows = []
    for b, s, d_in, d_out in _parse_shapes(args.shapes):
        rows.append(bench_shape(b, s, d_in, d_out, args.warmup, args.iters, naive=not args.no_naive))
        torch.cuda.empty_cache()
        print(f"done b={b} s={s} d_in={d_in} d_out={d_out}", file=sys.stderr)
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
