"""Autotune configs, their pruning and the TMA decision of the wgrad + sample-norm kernel.

Main API (private to `wgrad_sample_norm.py`): `_gpu_configs()`, `_prune_configs(...)`,
`_tma_mode(...)`, `_ensure_tma_allocator()`, `_autotune_cache_kwargs()`.

Two ways to bring the tiles into shared memory: cp.async (Ampere and Hopper, any strides)
and, on Hopper, the tensor-memory accelerator (TMA), which needs Megatron's contiguous
[s, b, h] activations. The launcher says which are allowed (TMA_MODE) and the autotuner
times the rest.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

try:
    import triton
except ImportError:  # pragma: no cover - the venv ships triton
    triton = None


def _config(bm, bn, bk, warps, stages, group_m=8, tma=False):
    """tma=None leaves USE_TMA to the launcher (the interpreter's single config)."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if tma is not None:
        kw["USE_TMA"] = tma
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _interpreting() -> bool:
    """True while TRITON_INTERPRET=1 (Triton reads it live; `@triton.jit` reads it at import)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _persistent_cache_dir() -> str:
    """Triton's cache (compiled kernels and, with `cache_results`, autotuning results):
    $TRITON_CACHE_DIR if set, else <$MEGATRON_EXT_CACHE_DIR or ~/.cache/megatron_ext>/triton,
    so the first --gns step of a later run neither recompiles nor re-tunes."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        base = os.environ.get("MEGATRON_EXT_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "megatron_ext")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(base, "triton")
    return os.environ["TRITON_CACHE_DIR"]


def _autotune_cache_kwargs() -> dict:
    """`cache_results=True` where this Triton's autotune has it (3.2+), not in the interpreter."""
    if triton is None or _interpreting():
        return {}
    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        return {}
    _persistent_cache_dir()
    return {"cache_results": True}


def _gpu_configs():
    # Two fp32 [BM, BN] accumulators live in registers (running dW tile + the current
    # sample's tile), so 128x128 tiles want 8 warps (64 + 64 regs/thread); 128x256 and
    # 256x64 tiles are left out (they would spill). Pruned to four configs per GPU
    # generation (plus two TMA ones on Hopper): each new shape tunes in a few seconds.
    return [
        # Hopper (sm90, 228 KB smem): BLOCK_K 64, deeper pipelines.
        _config(128, 128, 64, 8, 4),
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        # Ampere (sm80/86, 100-164 KB smem) and fp32 inputs: BLOCK_K 32, 3-4 stages.
        _config(128, 128, 32, 8, 3),
        _config(128, 64, 32, 4, 4),
        _config(64, 128, 32, 4, 4),
        _config(64, 64, 32, 4, 4),
        # Hopper with TMA (Megatron's [s, b, h] layout only, see `_tma_eligible`): the
        # tensor-memory accelerator fetches the tiles, zero-fills the token tail, and both
        # wgmma operands stay in shared memory.
        _config(128, 128, 64, 8, 4, tma=True),
        _config(128, 64, 64, 4, 4, tma=True),
    ]


def _block_k_for(major: int, element_size: int) -> int:
    """BLOCK_K of the configs a GPU generation tunes: 64 on Hopper for 16-bit inputs."""
    return 64 if major >= 9 and element_size < 4 else 32


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs meant for this GPU generation whose smem footprint fits.

    TMA_MODE (from the launcher) keeps only non-TMA configs (0), only TMA ones (1) or both
    (2, the autotuner picks). Hopper with 16-bit inputs keeps the BLOCK_K=64 set, the rest
    the BLOCK_K=32 set; fewer configs means a shorter one-off tuning per key.
    """
    if _interpreting() or not torch.cuda.is_available():
        return configs[:1]
    mode = kwargs.get("TMA_MODE", 0)
    configs = [c for c in configs if (c.kwargs["USE_TMA"] and mode >= 1)
               or (not c.kwargs["USE_TMA"] and mode != 1)]
    dev = named_args["x_ptr"].device
    props = torch.cuda.get_device_properties(dev)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    elt = named_args["x_ptr"].element_size()
    block_k = _block_k_for(props.major, elt)
    kept = []
    for c in configs:
        kw = c.kwargs
        if kw["BLOCK_K"] != block_k and not kw["USE_TMA"]:
            continue
        need = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elt * c.num_stages
        if need <= smem:
            kept.append(c)
    return kept or configs[-1:]


def _tma_eligible(t: torch.Tensor, strides, d: int, b: int) -> bool:
    """The TMA path's 2D view [S, B*D] needs samples side by side in each token row
    (Megatron's contiguous [s, b, h]), a 16-byte aligned base and row stride, and 16-byte
    aligned tile starts (i*D + tile offset), i.e. D a multiple of 16 bytes."""
    ss, sb, sh = strides
    elt = t.element_size()
    return (sh == 1 and sb == d and ss >= b * d and (ss * elt) % 16 == 0
            and (d * elt) % 16 == 0 and t.data_ptr() % 16 == 0)


def _tma_mode(x, dy, xs, ys, b, d_in, d_out, tma: Optional[bool], interpreted: bool) -> int:
    """0: cp.async configs only, 1: TMA configs only, 2: let the autotuner choose."""
    if tma is False:
        return 0
    ok = _tma_eligible(x, xs, d_in, b) and _tma_eligible(dy, ys, d_out, b)
    if tma:
        if not ok:
            raise ValueError("tma=True needs contiguous [s, b, h] x and dy (layout 'sbh', no "
                             "strided views) with 16-byte aligned rows and feature sizes")
        if x.is_cuda and not interpreted and torch.cuda.get_device_capability(x.device)[0] < 9:
            raise ValueError("tma=True needs a Hopper or newer GPU (sm_90+)")
        return 1
    if interpreted or not x.is_cuda:
        return 0  # tests ask for TMA explicitly; by default the interpreter runs one config
    hopper = torch.cuda.get_device_capability(x.device)[0] >= 9
    return 2 if ok and hopper and x.element_size() == 2 else 0


def _ensure_tma_allocator() -> None:
    """Device-side TMA descriptors need a small global scratch buffer per launch. Triton
    keeps its allocator in a context variable (per thread: autograd's backward runs on its
    own thread), so check it on every launch and install a torch-backed one if unset."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        unset = isinstance(_allocator.get(), NullAllocator)
    except (ImportError, AttributeError):  # other Triton versions: install ours
        unset = True
    if unset:
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
