"""Benchmark: fused dW + per-sample norms kernel vs cuBLAS dW and a Triton dW-only GEMM.

Usage:
    python benchmarks/bench_wgrad_sample_norm.py [--calls 20] [--reps 5] [--warmup 3]
        [--shapes "8,2048,2048,8192;1,32768,4096,4096"] [--naive] [--main-grad] [--no-graphs]
        [--jsonl rows.jsonl] [--out res.json] [--cpu-smoke]

Main API: ``bench_shape(...) -> dict`` (one row), ``time_calls`` (the timing method).

How it times (honest timings, issue 14): a call's device time is N back-to-back launches
between two CUDA events divided by N (no synchronisation between calls; the GPU first spins
for ~2x the launch loop's host time, so all N launches are queued before the window opens
and the GPU never waits on Python), median of --reps such windows.
Where the call can be captured, the same N calls also run as one CUDA graph replay, which
removes the host launch work altogether; the ratios use the graph times when every route of
the row was captured, else the event times (`timing` says which). The host overhead per call
(Python + launch, measured with `perf_counter` around the launch loop, before the
synchronisation) is reported separately: when it exceeds the device time, the event time is
host-bound and only the graph time is the kernel's.

Routes timed per (b, s, d_in, d_out), bf16, sequence-first [s, b, h] activations:
    cublas      dyᵀx as one [s*b]-deep GEMM (no per-sample norms): the target
    triton_dw   the fused kernel with its per-sample epilogue compiled out (dW only)
    fused       wgrad_sample_norms(x, dy): dW + ‖dW_i‖² for every sample
    fused_main_grad (--main-grad) the same adding dW into an fp32 main_grad (Megatron)
    bmm_norm, ghost (--naive) per-sample bmm then norms; ghost-norm identity + cuBLAS dW
and the GNS route the chooser (`megatron_ext.gns.routes.select_route`) picks for the shape
(`route: n/a` where that module is absent). One JSON line per shape is printed (and appended
to --jsonl) as soon as it is measured, so a run killed midway keeps every finished row; the
markdown table follows at the end. Columns: fused/cuBLAS, Triton-dW-only/cuBLAS,
fused/dW-only, route/cuBLAS. Without CUDA it exits 0 with a message; `--cpu-smoke` runs tiny
shapes on CPU through Triton's interpreter (checks the script, timings meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--cpu-smoke" in sys.argv:  # Triton reads it when the kernel module is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEFAULT_SHAPES = [  # (b, s, d_in, d_out)
    (8, 2048, 2048, 8192),
    (8, 4096, 4096, 4096),
    (4, 8192, 2048, 2048),
    (1, 32768, 4096, 4096),
    (16, 1024, 8192, 2048),
]
SMOKE_SHAPES = [(2, 16, 32, 48), (3, 8, 16, 16)]


def _parse_shapes(text, smoke=False):
    if not text:
        return SMOKE_SHAPES if smoke else DEFAULT_SHAPES
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]


def _events_ms(fn, calls, queue_ahead_s=0.0):
    """(device ms per call, host µs per call) of `calls` back-to-back launches.

    With queue_ahead_s > 0 the GPU first spins about that long (torch.cuda._sleep, <= 2 GHz
    assumed), so Python enqueues the launches while the GPU is busy and the window between
    the events holds no host gaps even when a call's host work exceeds its device time."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queue_ahead_s > 0 and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(queue_ahead_s * 2e9))
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0  # launch work only: nothing synchronises in the loop
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls, host / calls * 1e6


def _graph_ms(fn, calls, reps):
    """Device ms per call of `calls` calls captured in one CUDA graph (None if not capturable)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm the allocator on the capture stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - any capture failure means "no graph time"
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def time_calls(fn, calls, reps, warmup, graphs=True, cuda=True):
    """{"ms": events ms/call, "host_us": µs/call, "graph_ms": graph ms/call or None}.

    On CPU (cuda=False, the smoke test) wall time per call stands in for both."""
    try:
        for _ in range(warmup):  # the first call also autotunes the Triton kernel
            fn()
        if not cuda:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            ms = (time.perf_counter() - t0) / calls * 1e3
            return {"ms": ms, "host_us": ms * 1e3, "graph_ms": None}
        torch.cuda.synchronize()
        host_s = _events_ms(fn, calls)[1] * 1e-6 * calls  # sizes the GPU spin below
        samples = [_events_ms(fn, calls, queue_ahead_s=2.0 * host_s) for _ in range(reps)]
        out = {"ms": statistics.median(s[0] for s in samples),
               "host_us": statistics.median(s[1] for s in samples)}
        out["graph_ms"] = _graph_ms(fn, calls, reps) if graphs else None
        return out
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "host_us": None, "graph_ms": None, "error": "OOM"}


def _ratio(a, b):
    return a / b if a and b else None


def choose_route(b, s, d_in, d_out, dtype, device):
    """The GNS route chooser's pick for this shape, or route "n/a" without the module."""
    try:
        from megatron_ext.gns.routes import select_route
    except ImportError:
        return {"route": "n/a", "route_reason": "megatron_ext.gns.routes not present"}
    try:
        c = select_route(tokens_per_sample=s, d_in=d_in, d_out=d_out, samples=b, dtype=dtype,
                         device=device, measure=True)
    except Exception as e:  # noqa: BLE001 - the table still gets its other columns
        return {"route": "error", "route_reason": f"{type(e).__name__}: {e}"[:300]}
    return {"route": c.route, "route_reason": c.reason, "route_times_ms": dict(c.times_ms),
            "route_ms": c.times_ms.get(c.route)}


def _routes(x, dy, naive, main_grad=False):
    """name -> zero-argument callable for one shape's tensors."""
    from megatron_ext.kernels import wgrad_sample_norms

    s, b, d_in = x.shape
    d_out = dy.shape[-1]
    x2, dy2 = x.view(s * b, d_in), dy.view(s * b, d_out)
    fns = {"cublas": lambda: dy2.t() @ x2,  # [d_out, d_in]
           "triton_dw": lambda: wgrad_sample_norms(x, dy, compute_norms=False),
           "fused": lambda: wgrad_sample_norms(x, dy)}
    if main_grad:  # Megatron's gradient-accumulation fusion: dW added to an fp32 buffer
        buf = torch.zeros(d_out, d_in, device=x.device, dtype=torch.float32)
        fns["fused_main_grad"] = lambda: wgrad_sample_norms(x, dy, main_grad=buf)
    if naive:
        def bmm_norm():
            dw_i = torch.bmm(dy.permute(1, 2, 0), x.permute(1, 0, 2))  # [b, d_out, d_in]
            norms = torch.linalg.vector_norm(dw_i, dim=(1, 2), dtype=torch.float32).square()
            return dw_i.sum(0, dtype=torch.float32), norms

        def ghost():  # ‖dW_i‖² = ⟨x_i x_iᵀ, dy_i dy_iᵀ⟩ (Goodfellow 2015), batched
            xb, gb = x.permute(1, 0, 2), dy.permute(1, 0, 2)  # [b, s, h] views
            xx, gg = torch.bmm(xb, xb.transpose(1, 2)), torch.bmm(gb, gb.transpose(1, 2))
            return dy2.t() @ x2, (xx.float() * gg.float()).sum((1, 2))

        fns.update(bmm_norm=bmm_norm, ghost=ghost)
    return fns


def _accuracy(x, dy, row):
    """Fused dW vs cuBLAS dW, fused norms vs an fp32 loop over (at most) 2 samples."""
    from megatron_ext.kernels import wgrad_sample_norms

    s, b, _ = x.shape
    res = wgrad_sample_norms(x, dy)
    ref = (dy.reshape(s * b, -1).t() @ x.reshape(s * b, -1)).float()
    row["dw_max_rel_err"] = ((res.grad_weight.float() - ref).abs().max() / ref.abs().max()).item()
    errs = []
    for i in range(min(b, 2)):
        n_i = (dy[:, i].float().t() @ x[:, i].float()).square().sum()
        errs.append(((res.sq_norms_weight[i] - n_i).abs() / n_i).item())
    row["norm_max_rel_err"] = max(errs)
    row["accuracy_ok"] = row["dw_max_rel_err"] < 2e-2 and row["norm_max_rel_err"] < 2e-2


def bench_shape(b, s, d_in, d_out, calls=20, reps=5, warmup=3, naive=False, graphs=True,
                device="cuda", dtype=torch.bfloat16, stage="kernel_table", main_grad=False):
    """One table row (a dict, JSON-ready)."""
    x = torch.randn(s, b, d_in, device=device, dtype=dtype)  # [s, b, d_in]
    dy = torch.randn(s, b, d_out, device=device, dtype=dtype) / d_out**0.5  # [s, b, d_out]
    row = {"stage": stage, "b": b, "s": s, "d_in": d_in, "d_out": d_out,
           "dtype": str(dtype).replace("torch.", ""), "calls": calls, "reps": reps}
    timed = {name: time_calls(fn, calls, reps, warmup, graphs, cuda=device != "cpu")
             for name, fn in _routes(x, dy, naive, main_grad).items()}
    for name, t in timed.items():
        row[f"{name}_ms"], row[f"{name}_graph_ms"] = t["ms"], t["graph_ms"]
        row[f"{name}_host_us"] = t["host_us"]
    core = ("cublas", "triton_dw", "fused")
    use_graph = all(timed[n]["graph_ms"] for n in core)
    row["timing"] = "cuda-graph" if use_graph else ("events" if device != "cpu" else "cpu-wall")
    best = {n: timed[n]["graph_ms" if use_graph else "ms"] for n in core}
    row["fused/cublas"] = _ratio(best["fused"], best["cublas"])
    row["triton_dw/cublas"] = _ratio(best["triton_dw"], best["cublas"])
    row["fused/triton_dw"] = _ratio(best["fused"], best["triton_dw"])
    if best["fused"]:
        row["fused_tflops"] = 2.0 * s * b * d_in * d_out / (best["fused"] * 1e-3) / 1e12
    from megatron_ext.kernels import wgrad_sample_norm

    cfg = getattr(wgrad_sample_norm._wgrad_sample_norm_kernel, "best_config", None)
    row["fused_config"] = str(cfg) if cfg is not None else None
    row.update(choose_route(b, s, d_in, d_out, dtype, torch.device(device)))
    row["route/cublas"] = _ratio(row.get("route_ms"), best["cublas"])
    if best["fused"]:
        _accuracy(x, dy, row)
    return row


def _fmt(v, spec=".3f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def print_table(rows):
    cols = [("b", "d"), ("s", "d"), ("d_in", "d"), ("d_out", "d"), ("cublas_ms", ".3f"),
            ("triton_dw_ms", ".3f"), ("fused_ms", ".3f"), ("fused_host_us", ".0f"),
            ("timing", ""), ("fused/cublas", ".3f"), ("triton_dw/cublas", ".3f"),
            ("fused/triton_dw", ".3f"), ("route", ""), ("route/cublas", ".3f"),
            ("norm_max_rel_err", ".1e")]
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c), f) for c, f in cols) + " |")
    print("ms columns: back-to-back event time per call; ratios use the CUDA-graph times where "
          "`timing` says cuda-graph. Targets: fused/triton_dw <= 1.05 (s >= 2048), "
          "triton_dw/cublas <= 1.10, route/cublas <= 1.10.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing window")
    p.add_argument("--reps", type=int, default=5, help="timing windows (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (autotune)")
    p.add_argument("--shapes", default="", help='"b,s,d_in,d_out;..." (default: 5 shapes)')
    p.add_argument("--naive", action="store_true", help="also time the bmm / ghost routes")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--main-grad", action="store_true",
                   help="also time the fused kernel accumulating into an fp32 main_grad")
    p.add_argument("--jsonl", default="", help="append each row as one JSON line to this file")
    p.add_argument("--stage", default="kernel_table", help="the rows' \"stage\" value")
    p.add_argument("--out", default="", help="write all rows as one JSON document at the end")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.calls, args.reps, args.warmup = 1, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_wgrad_sample_norm: no CUDA device, nothing to benchmark (the kernel needs "
              "a GPU; --cpu-smoke checks the script on CPU).")
        return 0
    from megatron_ext.kernels import kernel_backend

    device = "cpu" if args.cpu_smoke else "cuda"
    name = "cpu" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"device: {name}  backend: {kernel_backend(torch.zeros(1, device=device))}  "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for b, s, d_in, d_out in _parse_shapes(args.shapes, args.cpu_smoke):
        row = bench_shape(b, s, d_in, d_out, args.calls, args.reps, args.warmup, args.naive,
                          graphs=not args.no_graphs, device=device, stage=args.stage,
                          main_grad=args.main_grad)
        row["device"] = name
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
