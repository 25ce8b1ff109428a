"""Alternative routes to dW + per-sample ‖dW_i‖²: cuBLAS dW plus ghost norms or a batched product.

Main API (same contract as `wgrad_sample_norms`, returns `WgradSampleNorms`):
    wgrad_sample_norms_ghost(x, dy, layout="sbh", *, main_grad=None, compute_bias=False)
    wgrad_sample_norms_batched(x, dy, layout="sbh", *, main_grad=None, compute_bias=False)
    wgrad_sample_norms_route(route, x, dy, layout, *, main_grad=None, compute_bias=False)
        route: "fused" (the Triton kernel of `wgrad_sample_norm`), "ghost" or "batched"

Both alternatives compute dW = Σ_t dy[t]ᵀ x[t] with one torch GEMM (cuBLAS on GPU, fp32
output when dW goes into an fp32 `main_grad`) and then the per-sample norms separately:

* ghost: ‖dW_i‖² = ‖Σ_t g_t x_tᵀ‖²_F = Σ_{t,t'} (g_t·g_t')(x_t·x_t')  (Goodfellow 2015;
  Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners"),
  i.e. ⟨X_i X_iᵀ, G_i G_iᵀ⟩ with two [T, T] Gram matrices per sample: 2T²(d_in + d_out) flops
  and T² memory per sample, cheap when T is small against the layer (2T² ≤ d_in·d_out).
* batched: dW_i = G_iᵀ X_i for a chunk of samples at a time (one bmm), then Σ dW_i²: as many
  flops as the dW GEMM itself and c·d_out·d_in fp32 memory per chunk of c samples.

Products run in fp32 (bf16/fp16 inputs: the GEMM's fp32 output on CUDA where torch offers
`out_dtype`, else upcast operands), so norms match the fused kernel's fp32 accumulators.
Samples are processed in chunks whose fp32 temporaries stay under `_CHUNK_BYTES`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .wgrad_sample_norm_reference import WgradSampleNorms, _check, _to_sbh

ROUTE_NAMES = ("fused", "ghost", "batched")
_CHUNK_BYTES = 256 << 20  # fp32 temporaries of one chunk of samples


_OUT_DTYPE_GEMM: dict = {}  # (dtype, ndim) -> whether torch.mm/bmm take out_dtype for it


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2D or batched 3D) with an fp32 result from fp32 accumulation."""
    if a.dtype == torch.float32:
        return a @ b
    key = (a.dtype, a.dim())
    if a.is_cuda and _OUT_DTYPE_GEMM.get(key, True):
        # fp32 output of the bf16/fp16 GEMM where torch supports it (no upcast); asked once
        # per dtype, not by an exception on every call
        try:
            out = (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_GEMM[key] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_GEMM[key] = False
    return a.float() @ b.float()


def _weight_and_bias_grad(xs, dys, main_grad, compute_bias):
    """dW by one GEMM over all tokens ([s*b, d]ᵀ [s*b, d]) and db; dW into main_grad if given."""
    s, b, d_in = xs.shape
    d_out = dys.shape[-1]
    x2, dy2 = xs.reshape(s * b, d_in), dys.reshape(s * b, d_out)  # views when contiguous
    if main_grad is not None:
        main_grad.add_(_mm32(dy2.t(), x2) if main_grad.dtype == torch.float32 else dy2.t() @ x2)
        grad_w = main_grad
    else:
        grad_w = dy2.t() @ x2  # [d_out, d_in] in x's dtype (fp32 accumulation in cuBLAS)
    db_i = dys.sum(0, dtype=torch.float32) if compute_bias else None  # [b, d_out]
    return grad_w, db_i


def _chunk(b: int, per_sample_bytes: int) -> int:
    return max(1, min(b, _CHUNK_BYTES // max(1, per_sample_bytes)))


def _finish(grad_w, norms, db_i, compute_bias) -> WgradSampleNorms:
    if not compute_bias:
        return WgradSampleNorms(grad_w, norms, None, None)
    return WgradSampleNorms(grad_w, norms, db_i.sum(0), db_i.square().sum(-1))


def wgrad_sample_norms_ghost(x: torch.Tensor, dy: torch.Tensor, layout: str = "sbh", *,
                             main_grad: Optional[torch.Tensor] = None,
                             compute_bias: bool = False) -> WgradSampleNorms:
    """dW by torch, ‖dW_i‖² by the ghost-norm identity (two [T, T] Gram matrices per sample)."""
    s, b, _, _ = _check(x, dy, layout, main_grad)
    xs, dys = _to_sbh(x, layout), _to_sbh(dy, layout)  # [s, b, h]
    grad_w, db_i = _weight_and_bias_grad(xs, dys, main_grad, compute_bias)
    norms = torch.empty(b, dtype=torch.float32, device=x.device)
    c = _chunk(b, 3 * s * s * 4)  # two Gram matrices and their product
    for i0 in range(0, b, c):
        xi = xs[:, i0:i0 + c].transpose(0, 1)  # [c, s, d_in]
        gi = dys[:, i0:i0 + c].transpose(0, 1)  # [c, s, d_out]
        gram_x = _mm32(xi, xi.transpose(1, 2))  # [c, s, s]
        gram_g = _mm32(gi, gi.transpose(1, 2))  # [c, s, s]
        norms[i0:i0 + c] = gram_x.mul_(gram_g).sum((1, 2))
    return _finish(grad_w, norms, db_i, compute_bias)


def wgrad_sample_norms_batched(x: torch.Tensor, dy: torch.Tensor, layout: str = "sbh", *,
                               main_grad: Optional[torch.Tensor] = None,
                               compute_bias: bool = False) -> WgradSampleNorms:
    """dW by torch, ‖dW_i‖² from the per-sample products dW_i = G_iᵀ X_i (bmm per chunk)."""
    s, b, d_in, d_out = _check(x, dy, layout, main_grad)
    xs, dys = _to_sbh(x, layout), _to_sbh(dy, layout)  # [s, b, h]
    grad_w, db_i = _weight_and_bias_grad(xs, dys, main_grad, compute_bias)
    norms = torch.empty(b, dtype=torch.float32, device=x.device)
    c = _chunk(b, 2 * d_out * d_in * 4)
    for i0 in range(0, b, c):
        gt = dys[:, i0:i0 + c].permute(1, 2, 0)  # [c, d_out, s]
        xi = xs[:, i0:i0 + c].transpose(0, 1)  # [c, s, d_in]
        norms[i0:i0 + c] = _mm32(gt, xi).square_().sum((1, 2))  # Σ (dW_i)²
    return _finish(grad_w, norms, db_i, compute_bias)


def wgrad_sample_norms_route(route: str, x: torch.Tensor, dy: torch.Tensor, layout: str = "sbh",
                             *, main_grad: Optional[torch.Tensor] = None,
                             compute_bias: bool = False) -> WgradSampleNorms:
    """dW + per-sample norms by the named route (see the module docstring)."""
    if route == "fused":
        from .wgrad_sample_norm import wgrad_sample_norms

        return wgrad_sample_norms(x, dy, layout, main_grad=main_grad, compute_bias=compute_bias)
    if route == "ghost":
        return wgrad_sample_norms_ghost(x, dy, layout, main_grad=main_grad, compute_bias=compute_bias)
    if route == "batched":
        return wgrad_sample_norms_batched(x, dy, layout, main_grad=main_grad,
                                          compute_bias=compute_bias)
    raise ValueError(f"route must be one of {ROUTE_NAMES}, got {route!r}")
