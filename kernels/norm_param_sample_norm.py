"""Per-sample squared gradient norms of bias and LayerNorm/RMSNorm parameters.

Main API:
    bias_sample_norms(dy, layout="sbh") -> (grad_bias [h] fp32, sq_norms [b] fp32)
    norm_param_sample_norms(dy, x_hat, layout="sbh", has_beta=True) -> NormParamSampleNorms
    norm_param_sample_norms_reference(...)   fp64 loop over single samples (tests)
    layer_norm_xhat(x, eps), rms_norm_xhat(x, eps)   the normalised input x̂

These parameters are vectors, so per-sample gradients are a cheap reduction over the
sample's tokens (no GEMM): db_i = Σ_t dy[t, i], dγ_i = Σ_t (dy ⊙ x̂)[t, i],
dβ_i = Σ_t dy[t, i]. Plain PyTorch is used (memory-bound either way); the γ product is
formed in fp32 chunks of tokens so long sequences do not allocate a full fp32 copy.
Works unchanged for Megatron's zero-centred γ (apply_layernorm_1p): d(1+w) = dw.
Gray et al. 2024 ("Normalization Layer Per-Example Gradients are Sufficient to Predict
Gradient Noise Scale in Transformers") motivate tracking these norms on their own.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

_LAYOUTS = ("sbh", "bsh")
# Upper bound on elements of the fp32 temporary per chunk (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


class NormParamSampleNorms(NamedTuple):
    """Summed grads (fp32) and per-sample squared norms ([b] fp32) of γ and β."""

    grad_gamma: torch.Tensor  # [h]
    sq_norms_gamma: torch.Tensor  # [b]
    grad_beta: Optional[torch.Tensor]  # [h] or None (RMSNorm)
    sq_norms_beta: Optional[torch.Tensor]  # [b] or None


def _token_dim(t: torch.Tensor, layout: str) -> int:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if t.dim() != 3:
        raise ValueError(f"expected a 3D [s, b, h] or [b, s, h] tensor, got shape {tuple(t.shape)}")
    return 0 if layout == "sbh" else 1


def _per_sample_sum(dy: torch.Tensor, layout: str) -> torch.Tensor:
    """Σ_t dy[t, i] in fp32 -> [b, h] (fp32 accumulation without an fp32 copy)."""
    return dy.sum(dim=_token_dim(dy, layout), dtype=torch.float32)


def bias_sample_norms(dy: torch.Tensor, layout: str = "sbh") -> Tuple[torch.Tensor, torch.Tensor]:
    """Bias grad and per-sample ‖db_i‖² from the output grad dy ([s, b, h] / [b, s, h])."""
    db_i = _per_sample_sum(dy, layout)  # [b, h]
    return db_i.sum(0), db_i.square().sum(-1)


def _per_sample_product_sum(dy: torch.Tensor, x_hat: torch.Tensor, layout: str) -> torch.Tensor:
    """Σ_t (dy ⊙ x̂)[t, i] in fp32 -> [b, h], in token chunks to bound memory."""
    dim = _token_dim(dy, layout)
    if dy.shape != x_hat.shape:
        raise ValueError(f"dy {tuple(dy.shape)} and x_hat {tuple(x_hat.shape)} must match")
    s = dy.shape[dim]
    per_token = max(1, dy.numel() // max(s, 1))
    chunk = max(1, _CHUNK_ELEMENTS // per_token)
    b, h = (dy.shape[1], dy.shape[2]) if dim == 0 else (dy.shape[0], dy.shape[2])
    out = torch.zeros(b, h, dtype=torch.float32, device=dy.device)
    for start in range(0, s, chunk):
        d = dy.narrow(dim, start, min(chunk, s - start)).float()
        xh = x_hat.narrow(dim, start, min(chunk, s - start)).float()
        out += (d * xh).sum(dim)
    return out


def norm_param_sample_norms(
    dy: torch.Tensor, x_hat: torch.Tensor, layout: str = "sbh", has_beta: bool = True
) -> NormParamSampleNorms:
    """Grads and per-sample squared norms of a LayerNorm (γ, β) or RMSNorm (γ only).

    Args:
        dy: grad of the norm's output, [s, b, h] ("sbh") or [b, s, h] ("bsh").
        x_hat: the normalised input (before γ, β), same shape; see `layer_norm_xhat`.
        layout: which axis indexes samples.
        has_beta: False for RMSNorm.
    """
    dg_i = _per_sample_product_sum(dy, x_hat, layout)  # [b, h]
    grad_beta = sq_beta = None
    if has_beta:
        grad_beta, sq_beta = bias_sample_norms(dy, layout)
    return NormParamSampleNorms(dg_i.sum(0), dg_i.square().sum(-1), grad_beta, sq_beta)


def norm_param_sample_norms_reference(
    dy: torch.Tensor, x_hat: torch.Tensor, layout: str = "sbh", has_beta: bool = True
) -> NormParamSampleNorms:
    """fp64 loop over single samples; same contract as `norm_param_sample_norms`."""
    dim = _token_dim(dy, layout)
    b = dy.shape[1 - dim]
    gs, ng, bs, nb = [], [], [], []
    for i in range(b):
        d = dy.select(1 - dim, i).double()  # [s, h]
        xh = x_hat.select(1 - dim, i).double()
        g = (d * xh).sum(0)
        gs.append(g)
        ng.append(g.square().sum())
        bb = d.sum(0)
        bs.append(bb)
        nb.append(bb.square().sum())
    grad_gamma = torch.stack(gs).sum(0).float()
    sq_gamma = torch.stack(ng).float()
    if not has_beta:
        return NormParamSampleNorms(grad_gamma, sq_gamma, None, None)
    return NormParamSampleNorms(grad_gamma, sq_gamma, torch.stack(bs).sum(0).float(), torch.stack(nb).float())


def layer_norm_xhat(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, computed in fp32."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = xf.var(-1, unbiased=False, keepdim=True)
    return (xf - mean) * torch.rsqrt(var + eps)


def rms_norm_xhat(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, computed in fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
