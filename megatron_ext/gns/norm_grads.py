"""Per-sample γ/β gradients of LayerNorm / RMSNorm in one pass (Triton on GPU).

Main API:
    per_sample_norm_grads(dy, x, mean, rstd, has_beta) -> (dgamma_i [b, h], dbeta_i [b, h] | None)

For y = x̂ γ + β with x̂ = (x - mean) * rstd (RMSNorm: mean = None), sample i's parameter
gradients are dγ_i = Σ_t dy[t, i] ⊙ x̂[t, i] and dβ_i = Σ_t dy[t, i] (Gray et al. 2024,
"Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
Transformers"). The GPU kernel reads dy and x once in their own dtype and rebuilds x̂ on the
fly from the saved per-token statistics, so the extra traffic over the normal norm backward
is one read of dy and x (no fp32 [s, b, h] temporaries). Programs own a (sample,
hidden-block, token-chunk) tile; token chunks meet through fp32 atomics. Elsewhere (CPU,
no Triton) an eager PyTorch version with the same contract runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the venv ships triton
    triton = None


if triton is not None:

    @triton.jit
    def _norm_grads_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dg_ptr, db_ptr,
                           S, H, chunk,
                           s_dy_s, s_dy_b, s_x_s, s_x_b, s_st_s, s_st_b,
                           HAS_MEAN: tl.constexpr, HAS_BETA: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        i = tl.program_id(0)  # sample
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        s_begin = tl.program_id(2) * chunk
        acc_g = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_H], dtype=tl.float32)
        # Loop bounds from scalar arguments only (Triton 3.6's interpreter cannot take a
        # program_id-derived tensor as a range bound).
        for k0 in range(0, chunk, BLOCK_S):
            offs_s = s_begin + k0 + tl.arange(0, BLOCK_S)
            mask_s = (offs_s < S) & (offs_s < s_begin + chunk)
            m2 = mask_s[:, None] & mask_h[None, :]
            dy = tl.load(dy_ptr + offs_s[:, None] * s_dy_s + i * s_dy_b + offs_h[None, :],
                         mask=m2, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs_s[:, None] * s_x_s + i * s_x_b + offs_h[None, :],
                        mask=m2, other=0.0).to(tl.float32)
            r = tl.load(rstd_ptr + offs_s * s_st_s + i * s_st_b, mask=mask_s, other=0.0)
            if HAS_MEAN:
                mu = tl.load(mean_ptr + offs_s * s_st_s + i * s_st_b, mask=mask_s, other=0.0)
                xh = (x - mu[:, None]) * r[:, None]
            else:
                xh = x * r[:, None]
            acc_g += tl.sum(dy * xh, axis=0)
            if HAS_BETA:
                acc_b += tl.sum(dy, axis=0)
        tl.atomic_add(dg_ptr + i * H + offs_h, acc_g, mask=mask_h)
        if HAS_BETA:
            tl.atomic_add(db_ptr + i * H + offs_h, acc_b, mask=mask_h)


# Triton decides at decoration (import) time whether a kernel is interpreted.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def _use_triton(t: torch.Tensor) -> bool:
    if triton is None:
        return False
    if t.is_cuda:
        return not _INTERPRETED
    # CPU: only Triton's interpreter (tests), when it was on at import and still is
    return _INTERPRETED and bool(triton.knobs.runtime.interpret)


def per_sample_norm_grads_reference(dy, x, mean, rstd, has_beta: bool):
    """Eager PyTorch twin of `per_sample_norm_grads` (CPU path and test oracle)."""
    x32 = x.float()
    xhat = (x32 - mean) * rstd if mean is not None else x32 * rstd  # [s, b, h]
    dy32 = dy.float()
    dg = (dy32 * xhat).sum(0)  # [b, h]
    return dg, (dy32.sum(0) if has_beta else None)


def per_sample_norm_grads(dy: torch.Tensor, x: torch.Tensor, mean: Optional[torch.Tensor],
                          rstd: torch.Tensor, has_beta: bool
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dγ_i and dβ_i ([b, h] fp32) of every sample.

    dy, x: [s, b, h] (any float dtype, last dim contiguous after `.contiguous()` if not);
    mean (LayerNorm) / rstd: [s, b] or [s, b, 1] fp32 per-token statistics of the forward.
    """
    if not _use_triton(dy):
        return per_sample_norm_grads_reference(dy, x, mean, rstd, has_beta)
    s, b, h = dy.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    rstd = rstd.reshape(s, b).float().contiguous()
    mean_t = mean.reshape(s, b).float().contiguous() if mean is not None else rstd
    dg = torch.zeros(b, h, dtype=torch.float32, device=dy.device)
    db = torch.zeros(b, h, dtype=torch.float32, device=dy.device) if has_beta else dg
    block_h = min(128, triton.next_power_of_2(h))
    block_s = 32
    n_h = triton.cdiv(h, block_h)
    # enough programs to fill the GPU even for one sample: split the tokens
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
    n_split = max(1, min(triton.cdiv(s, block_s), triton.cdiv(4 * sms, b * n_h)))
    chunk = triton.cdiv(triton.cdiv(s, n_split), block_s) * block_s
    n_split = triton.cdiv(s, chunk)
    _norm_grads_kernel[(b, n_h, n_split)](
        dy, x, mean_t, rstd, dg, db, s, h, chunk,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), rstd.stride(0), rstd.stride(1),
        HAS_MEAN=mean is not None, HAS_BETA=has_beta, BLOCK_S=block_s, BLOCK_H=block_h)
    return dg, (db if has_beta else None)
