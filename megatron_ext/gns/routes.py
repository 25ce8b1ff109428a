"""Which route computes dW + per-sample ‖dW_i‖² of a GNS linear: chosen per layer shape.

Main API:
    ROUTES = ("fused", "ghost", "batched")
    RouteChoice(route, times_ms, reason)
    select_route(tokens_per_sample, d_in, d_out, samples, dtype, device, forced=None,
                 measure=True) -> RouteChoice
    analytic_route(tokens_per_sample, d_in, d_out) -> (route, extra_costs)
    linear_route(recorder, input, weight, sequence_parallel, tp_group) -> str   (gns/layers.py)
    model_routes(model_chunks, recorder, tokens_per_sample, samples, forced) -> one log line
    cache_dir() / cache_file()

Routes (`megatron_ext.kernels.wgrad_sample_norms_route`): "fused" = the Triton kernel (dW and
the norms in one pass); "ghost" = torch/cuBLAS dW + norms by the ghost-norm identity
‖Σ_t g_t x_tᵀ‖² = Σ_{t,t'} (g_t·g_t')(x_t·x_t') (Li et al. 2022); "batched" = torch dW + a
per-sample product G_iᵀ X_i (bmm) squared. All give the same dW and norms up to rounding.

Decision (`--gns-route auto`):
* CUDA with the compiled kernel: every route is timed once at first use of a shape (a few
  back-to-back calls between two CUDA events, after one warm-up call that also runs the
  kernel's autotuning); the fastest wins. Choices are cached in-process and in
  `cache_file()` (JSON, keyed by shape, dtype, device name, torch and triton versions).
* Otherwise (CPU, the Triton interpreter, or measure=False) nothing is timed; the analytic
  rule picks the smallest extra cost relative to the dW GEMM (2·T·b·d_in·d_out flops):
  fused `FUSED_EXTRA` (an estimate: a Triton GEMM runs at ~0.85-0.9x cuBLAS, plus draining
  the MMAs at each sample boundary; issue 14's roofline), ghost T·(d_in+d_out)/(d_in·d_out)
  (two [T, T] Gram matrices per sample; only when their 2T² floats per sample fit in the
  d_in·d_out of a per-sample dW), batched 1 (a second GEMM of dW's size). Ties go to fused.
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

ROUTES = ("fused", "ghost", "batched")
FUSED_EXTRA = 0.15  # estimated, not measured: see the module docstring
MEASURE_CALLS = 5

_CHOICES: Dict[str, "RouteChoice"] = {}  # in-process cache, key from `_key`
_LOCK = threading.Lock()
_FILE_LOADED = False


@dataclass
class RouteChoice:
    """The route of one layer shape, how long each route took (ms per call; empty when
    nothing was measured) and why it was chosen."""

    route: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    reason: str = ""


def cache_dir() -> str:
    """$MEGATRON_EXT_CACHE_DIR, else ~/.cache/megatron_ext (also the default Triton cache)."""
    return os.environ.get("MEGATRON_EXT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_ext")


def cache_file() -> str:
    return os.path.join(cache_dir(), "gns_routes.json")


def analytic_route(tokens_per_sample: int, d_in: int, d_out: int) -> Tuple[str, Dict[str, float]]:
    """(route, extra cost of each route relative to the dW GEMM) by the FLOP/memory rule."""
    t = tokens_per_sample
    ghost = t * (d_in + d_out) / (d_in * d_out) if 2 * t * t <= d_in * d_out else math.inf
    extra = {"fused": FUSED_EXTRA, "ghost": ghost, "batched": 1.0}
    return min(ROUTES, key=lambda r: (extra[r], ROUTES.index(r))), extra


def _check_route(forced: Optional[str]) -> Optional[str]:
    if forced in (None, "auto"):
        return None
    if forced not in ROUTES:
        raise ValueError(f"--gns-route must be auto or one of {ROUTES}, got {forced!r}")
    return forced


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _key(t, d_in, d_out, b, dtype, device) -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "none"
    return (f"T{t}:b{b}:{d_out}x{d_in}:{str(dtype).replace('torch.', '')}:{_device_name(device)}"
            f":torch{torch.__version__}:triton{tv}")


def _load_file() -> None:
    global _FILE_LOADED
    _FILE_LOADED = True
    try:
        with open(cache_file()) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    for k, v in saved.items():
        if isinstance(v, dict) and v.get("route") in ROUTES:
            _CHOICES.setdefault(k, RouteChoice(v["route"], dict(v.get("times_ms", {})),
                                               "measured earlier (" + cache_file() + ")"))


def _save_file() -> None:
    """Best effort (a read-only home must not stop training): write, then rename."""
    data = {k: {"route": c.route, "times_ms": c.times_ms} for k, c in _CHOICES.items() if c.times_ms}
    path = cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _can_measure(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _compiled_kernel_on(device)


@functools.lru_cache(maxsize=None)
def _compiled_kernel_on(device: torch.device) -> bool:
    from megatron_ext.kernels import kernel_backend

    return kernel_backend(torch.empty(0, device=device)) == "triton"


def measure_routes(t: int, d_in: int, d_out: int, b: int, dtype, device,
                   calls: int = MEASURE_CALLS) -> Dict[str, float]:
    """ms per call of each route on random [t, b, d] inputs, dW into an fp32 main_grad (as
    under Megatron's gradient-accumulation fusion). A route that runs out of memory: inf."""
    from megatron_ext.kernels import wgrad_sample_norms_route

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, b, d_in, device=device, dtype=dtype, generator=g)
    dy = torch.randn(t, b, d_out, device=device, dtype=dtype, generator=g)
    main_grad = torch.zeros(d_out, d_in, device=device, dtype=torch.float32)
    times = {}
    for route in ROUTES:
        def call():
            wgrad_sample_norms_route(route, x, dy, "sbh", main_grad=main_grad)
        try:
            call()  # warm-up: compilation, the fused kernel's autotuning
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):  # back to back: host launch work overlaps the GPU
                call()
            end.record()
            end.synchronize()
            times[route] = start.elapsed_time(end) / calls
        except torch.cuda.OutOfMemoryError:
            times[route] = math.inf
    return times


def select_route(tokens_per_sample: int, d_in: int, d_out: int, samples: int, dtype, device,
                 forced: Optional[str] = None, measure: bool = True) -> RouteChoice:
    """The route for a linear with this shape (see the module docstring for the rule)."""
    forced = _check_route(forced)
    if forced is not None:
        return RouteChoice(forced, {}, "forced by --gns-route")
    device = torch.device(device)
    measurable = measure and _can_measure(device)
    key = _key(tokens_per_sample, d_in, d_out, samples, dtype, device)
    if not measurable:
        key += ":rule"
    with _LOCK:
        if measurable and not _FILE_LOADED:
            _load_file()
        choice = _CHOICES.get(key)
        if choice is not None:
            return choice
        if measurable:
            times = measure_routes(tokens_per_sample, d_in, d_out, samples, dtype, device)
            route = min(ROUTES, key=lambda r: (times[r], ROUTES.index(r)))
            ms = "/".join(f"{r} {times[r]:.3g}" for r in ROUTES)
            choice = RouteChoice(route, times, f"measured ({ms} ms per call)")
            _CHOICES[key] = choice
            _save_file()
        else:
            route, extra = analytic_route(tokens_per_sample, d_in, d_out)
            why = "CPU" if device.type != "cuda" else "measurement off"
            costs = "/".join(f"{r} {extra[r]:.2g}" for r in ROUTES)
            choice = RouteChoice(route, {}, f"analytic FLOP/memory rule ({why}, nothing timed): "
                                            f"extra cost vs dW {costs}")
            _CHOICES[key] = choice
        return choice


def _forced_of(recorder) -> Optional[str]:
    return getattr(getattr(recorder, "config", None), "gns_route", None)


def linear_route(recorder, input: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool,
                 tp_group) -> str:
    """Route of a measured linear's backward; input [s(/t), b, d_in], weight [d_out, d_in]."""
    forced = _check_route(_forced_of(recorder))
    if forced is not None:
        return forced
    tp = 1
    if sequence_parallel and tp_group is not None:
        import torch.distributed as dist

        tp = dist.get_world_size(tp_group)  # the kernel sees the gathered [s, b, d_in]
    return select_route(input.shape[0] * tp, weight.shape[1], weight.shape[0], input.shape[1],
                        input.dtype, input.device).route


def model_routes(model_chunks, recorder, tokens_per_sample: int, samples: int,
                 forced: Optional[str] = None) -> str:
    """Choose (and on CUDA measure) the route of every GNS linear's shape; one log line."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    shapes = {}
    for chunk in model_chunks:
        while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
            chunk = chunk.module
        for m in chunk.modules():
            w = getattr(m, "weight", None)
            if (getattr(m, "gns_recorder", None) is recorder and w is not None
                    and isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                    and not getattr(m, "is_expert", False)):
                shapes[(w.shape[0], w.shape[1])] = (w.dtype, w.device)
    parts, reasons = [], set()
    for (d_out, d_in), (dtype, device) in sorted(shapes.items()):
        c = select_route(tokens_per_sample, d_in, d_out, samples, dtype, device, forced=forced)
        times = f" [{c.reason}]" if c.times_ms else ""
        reasons.add("measured on first use" if c.times_ms else c.reason.split(":")[0])
        parts.append(f"{d_out}x{d_in} {c.route}{times}")
    how = "; ".join(sorted(reasons)) or "no GNS linears"
    return f"route per dW shape (T={tokens_per_sample}, b={samples}): {', '.join(parts)}; {how}"


__all__ = ["ROUTES", "RouteChoice", "select_route", "analytic_route", "linear_route",
           "model_routes", "measure_routes", "cache_dir", "cache_file"]
