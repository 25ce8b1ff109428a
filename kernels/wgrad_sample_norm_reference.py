"""Pure-PyTorch reference of the fused wgrad + per-sample-norm kernel, and shape helpers.

Main API:
    wgrad_sample_norms_reference(x, dy, layout="sbh", *, main_grad=None, compute_bias=False)
        -> WgradSampleNorms
It is the test oracle of `wgrad_sample_norm` and its CPU fallback when Triton's
interpreter is off. Math is fp32, one [d_out, d_in] GEMM per sample (memory stays at
one extra dW), so it is exact in the sense the kernel is: dW_i is complete before squaring.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_LAYOUTS = ("sbh", "bsh")


class WgradSampleNorms(NamedTuple):
    """Result of `wgrad_sample_norms` (all norms are fp32, shape [b])."""

    grad_weight: torch.Tensor  # [d_out, d_in]; `main_grad` itself when one was given
    sq_norms_weight: torch.Tensor  # [b] fp32, ‖dW_i‖²_F
    grad_bias: Optional[torch.Tensor]  # [d_out] fp32 or None
    sq_norms_bias: Optional[torch.Tensor]  # [b] fp32 ‖db_i‖² or None


def _sample_strides(t: torch.Tensor, layout: str):
    """(stride_token, stride_sample, stride_feature) and (s, b, h) of a 3D activation."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if t.dim() != 3:
        raise ValueError(f"expected a 3D [s, b, h] or [b, s, h] tensor, got shape {tuple(t.shape)}")
    if layout == "sbh":
        s, b, h = t.shape
        return (t.stride(0), t.stride(1), t.stride(2)), (s, b, h)
    b, s, h = t.shape
    return (t.stride(1), t.stride(0), t.stride(2)), (s, b, h)


def _check(x, dy, layout, main_grad):
    _, (s, b, d_in) = _sample_strides(x, layout)
    _, (s2, b2, d_out) = _sample_strides(dy, layout)
    if (s, b) != (s2, b2):
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} disagree on tokens/samples")
    if main_grad is not None:
        if tuple(main_grad.shape) != (d_out, d_in):
            raise ValueError(f"main_grad must have shape {(d_out, d_in)}, got {tuple(main_grad.shape)}")
        if main_grad.device != x.device:
            raise ValueError("main_grad must live on the same device as x")
    return s, b, d_in, d_out


def _to_sbh(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "sbh" else t.transpose(0, 1)  # a view, no copy


def wgrad_sample_norms_reference(
    x: torch.Tensor,
    dy: torch.Tensor,
    layout: str = "sbh",
    *,
    main_grad: Optional[torch.Tensor] = None,
    compute_bias: bool = False,
) -> WgradSampleNorms:
    """Pure-PyTorch twin of `wgrad_sample_norms` (fp32 math, one GEMM per sample).

    Also the CPU fallback when the Triton interpreter is off.
    """
    s, b, d_in, d_out = _check(x, dy, layout, main_grad)
    xs, dys = _to_sbh(x, layout), _to_sbh(dy, layout)  # [s, b, h]
    dw = torch.zeros(d_out, d_in, dtype=torch.float32, device=x.device)
    norms = torch.zeros(b, dtype=torch.float32, device=x.device)
    db = torch.zeros(d_out, dtype=torch.float32, device=x.device) if compute_bias else None
    norms_b = torch.zeros(b, dtype=torch.float32, device=x.device) if compute_bias else None
    for i in range(b):  # one sample at a time keeps memory at one [d_out, d_in] tile
        dw_i = dys[:, i].float().t() @ xs[:, i].float()  # [d_out, d_in]
        norms[i] = dw_i.square().sum()
        dw += dw_i
        if compute_bias:
            db_i = dys[:, i].float().sum(0)  # [d_out]
            norms_b[i] = db_i.square().sum()
            db += db_i
    if main_grad is not None:
        main_grad.add_(dw.to(main_grad.dtype))
        grad_w = main_grad
    else:
        grad_w = dw.to(x.dtype)
    return WgradSampleNorms(grad_w, norms, db, norms_b)
