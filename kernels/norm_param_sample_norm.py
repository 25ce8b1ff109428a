"""LayerNorm / RMSNorm whose backward reports per-sample γ/β gradients (Triton on GPU).

Main API:
    NormWithSampleNorms.apply(x, weight, bias, sink, normalization="LayerNorm", eps=1e-5,
                              zero_centered_gamma=False) -> y
    norm_param_sample_grads(dy, x, mean, rstd, has_beta)
        -> (dgamma_i [b, h] fp32, dbeta_i [b, h] fp32 | None)
    norm_param_sample_grads_reference(...)   same contract, pure PyTorch
    norm_param_backend(tensor) -> "triton" | "triton-interpret" | "torch-reference"

For y = x̂ γ + β with x̂ = (x - mean) * rstd (RMSNorm: no mean, no β), sample i's parameter
gradients are dγ_i = Σ_t dy[t, i] ⊙ x̂[t, i] and dβ_i = Σ_t dy[t, i] (Gray et al. 2024,
"Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale
in Transformers"). These parameters are vectors, so per-sample gradients are a reduction
over the sample's tokens (no GEMM). The kernel reads dy and x once in their own dtype and
rebuilds x̂ on the fly from the forward's per-token statistics: the extra traffic over the
norm's own backward is one read of dy and x, with no fp32 [s, b, h] temporaries. Programs
own a (sample, hidden block, token chunk) tile; token chunks meet through fp32 atomics.

The sink gets the per-sample *vectors* ([b, h], or [b, 2h] = [dγ_i, dβ_i]), not their
squared norms: under sequence parallelism each tensor-parallel rank holds a token share of
them, which must be summed before squaring. Zero-centred γ (stored as γ - 1): d(1+w) = dw.
Triton decides at import whether kernels run in its CPU interpreter (TRITON_INTERPRET=1
set before import, and still set at call time); otherwise CPU tensors use the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the venv ships triton
    triton = None

NORMALIZATIONS = ("LayerNorm", "RMSNorm")

if triton is not None:

    @triton.jit
    def _kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dg_ptr, db_ptr, S, H, chunk, N_MID,
                s_dy_s, s_dy_b, s_dy_n, s_x_s, s_x_b, s_x_n, s_st_s, s_st_b, s_st_n,
                HAS_MEAN: tl.constexpr, HAS_BETA: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        # A sample's "tokens" are the S = s * N_MID rows (position, head) of [s, b, N_MID, h]
        # (N_MID = 1 for [s, b, h]); row r is (r // N_MID, r % N_MID).
        i = tl.program_id(0).to(tl.int64)  # sample; int64: offsets reach s*b*h >= 2^31
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
            row = offs_s.to(tl.int64)
            pos, mid = row // N_MID, row % N_MID
            m2 = mask_s[:, None] & mask_h[None, :]
            o_dy = pos * s_dy_s + mid * s_dy_n + i * s_dy_b  # [BLOCK_S] int64
            o_x = pos * s_x_s + mid * s_x_n + i * s_x_b
            o_st = pos * s_st_s + mid * s_st_n + i * s_st_b
            dy = tl.load(dy_ptr + o_dy[:, None] + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + o_x[:, None] + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
            r = tl.load(rstd_ptr + o_st, mask=mask_s, other=0.0)
            if HAS_MEAN:
                mu = tl.load(mean_ptr + o_st, mask=mask_s, other=0.0)
                xh = (x - mu[:, None]) * r[:, None]
            else:
                xh = x * r[:, None]
            acc_g += tl.sum(dy * xh, axis=0)
            if HAS_BETA:
                acc_b += tl.sum(dy, axis=0)
        # Token chunks of one sample meet here; nothing is ordered against these adds, so
        # relaxed atomics suffice (no acquire/release fences).
        tl.atomic_add(dg_ptr + i * H + offs_h, acc_g, mask=mask_h, sem="relaxed")
        if HAS_BETA:
            tl.atomic_add(db_ptr + i * H + offs_h, acc_b, mask=mask_h, sem="relaxed")
else:  # pragma: no cover
    _kernel = None


def norm_param_backend(t: torch.Tensor) -> str:
    """Which implementation `norm_param_sample_grads` uses for tensors like `t`."""
    if _kernel is None:
        return "torch-reference"
    if type(_kernel).__name__ == "InterpretedFunction":  # built under TRITON_INTERPRET=1
        live = bool(triton.knobs.runtime.interpret)  # and the variable is still set
        return "triton-interpret" if live else "torch-reference"
    return "triton" if t.is_cuda else "torch-reference"


def norm_param_sample_grads_reference(dy, x, mean, rstd, has_beta: bool):
    """Eager PyTorch twin of `norm_param_sample_grads` (CPU path and test oracle)."""
    x32 = x.float()
    xhat = (x32 - mean) * rstd if mean is not None else x32 * rstd  # [s, b, (n,) h]
    dy32 = dy.float()
    tokens = [0] + list(range(2, dy.dim() - 1))  # every dim but samples (1) and features
    return (dy32 * xhat).sum(tokens), (dy32.sum(tokens) if has_beta else None)  # [b, h]


def _split_tokens(s: int, b: int, n_h: int, block_s: int, device) -> int:
    """Token chunk per program, so that even one sample fills the GPU."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    n_split = max(1, min(triton.cdiv(s, block_s), triton.cdiv(4 * sms, b * n_h)))
    return triton.cdiv(triton.cdiv(s, n_split), block_s) * block_s


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """[s, b, h] -> [s, b, 1, h] and [s, b, n1, n2, .., h] -> [s, b, n, h] (views if possible)."""
    if t.dim() == 3:
        return t.unsqueeze(2)
    return t if t.dim() == 4 else t.flatten(2, -2)


def norm_param_sample_grads(dy: torch.Tensor, x: torch.Tensor, mean: Optional[torch.Tensor],
                            rstd: torch.Tensor, has_beta: bool
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dγ_i and dβ_i ([b, h] fp32) of every sample.

    dy, x: [s, b, h], or [s, b, heads, h] (q/k layernorm: every head's row is one more
    token of the sample), any float dtype; mean (LayerNorm, else None) / rstd: fp32
    per-token statistics of the forward ([s, b(, heads)] with or without a trailing 1).
    """
    if dy.dim() < 3:
        raise ValueError(f"expected [s, b, (heads,) h] activations, got shape {tuple(dy.shape)}")
    if norm_param_backend(dy) == "torch-reference" or dy.numel() == 0:
        return norm_param_sample_grads_reference(dy, x, mean, rstd, has_beta)
    dy4, x4 = _as_4d(dy), _as_4d(x)  # [s, b, n, h]
    s, b, n, h = dy4.shape
    dy4 = dy4 if dy4.stride(-1) == 1 else dy4.contiguous()
    x4 = x4 if x4.stride(-1) == 1 else x4.contiguous()
    rstd = rstd.reshape(s, b, n).float()
    mean_t = mean.reshape(s, b, n).float() if mean is not None else rstd
    dg = torch.zeros(b, h, dtype=torch.float32, device=dy.device)
    db = torch.zeros(b, h, dtype=torch.float32, device=dy.device) if has_beta else dg
    block_h, block_s = min(128, triton.next_power_of_2(h)), 32
    n_h = triton.cdiv(h, block_h)
    chunk = _split_tokens(s * n, b, n_h, block_s, dy.device)
    if mean is not None and mean_t.stride() != rstd.stride():
        mean_t = mean_t.contiguous()
        rstd = rstd.contiguous()
    _kernel[(b, n_h, triton.cdiv(s * n, chunk))](
        dy4, x4, mean_t, rstd, dg, db, s * n, h, chunk, n,
        dy4.stride(0), dy4.stride(1), dy4.stride(2), x4.stride(0), x4.stride(1), x4.stride(2),
        rstd.stride(0), rstd.stride(1), rstd.stride(2),
        HAS_MEAN=mean is not None, HAS_BETA=has_beta, BLOCK_S=block_s, BLOCK_H=block_h)
    return dg, (db if has_beta else None)


def _forward(x, gamma, beta, normalization: str, eps: float):
    """(y in x's dtype, mean or None, rstd); fp32 math, the same ops as `SPNorm`.

    LayerNorm: ATen's mixed-dtype kernel (x in its own dtype, fp32 γ/β, fp32 statistics)
    makes no fp32 copy of x. RMSNorm: one fp32 copy of x (scaled in place) and its square.
    """
    if normalization == "LayerNorm":
        return torch.native_layer_norm(x, [x.shape[-1]], gamma, beta, eps)
    x32 = x.float()  # the one fp32 copy (x itself if already fp32)
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)  # [s, b, (n,) 1]
    out = x32 * rstd if x32 is x else x32.mul_(rstd)
    return out.mul_(gamma).to(x.dtype), None, rstd


def _input_grad(dy, x, gamma, mean, rstd):
    """dx in x's dtype: ATen's (mixed-dtype) layer-norm backward, or RMSNorm's closed form
    dx = rstd·(dy·γ - x̂·mean(dy·γ·x̂)) with two fp32 temporaries updated in place."""
    if mean is not None:
        return torch.ops.aten.native_layer_norm_backward(
            dy, x, [x.shape[-1]], mean, rstd, gamma, None, [True, False, False])[0]
    dxhat = dy * gamma  # [s, b, h] fp32 (type promotion: no separate upcast copy)
    xhat = x * rstd  # [s, b, h] fp32
    proj = torch.linalg.vecdot(dxhat, xhat).unsqueeze(-1) / x.shape[-1]  # [s, b, 1]
    return dxhat.sub_(xhat.mul_(proj)).mul_(rstd).to(x.dtype)


class NormWithSampleNorms(torch.autograd.Function):
    """LayerNorm/RMSNorm over the last dim, fp32 math, output in x's dtype.

    Args of `apply`: x [s, b, h] or [s, b, heads, h] (q/k layernorm); weight γ [h] (stored γ - 1 if `zero_centered_gamma`);
    bias β [h] or None; sink: callable taking the fp32 per-sample vectors [b, h] (dγ_i)
    or [b, 2h] (dγ_i, dβ_i), or None; normalization "LayerNorm" | "RMSNorm"; eps.
    Saves x in its own dtype plus the per-token mean/rstd (no fp32 [s, b, h] copy; LayerNorm
    makes none in backward either, RMSNorm two transient ones); the
    summed γ/β grads are the sums of the per-sample ones, never computed twice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sink, normalization="LayerNorm", eps=1e-5,
                zero_centered_gamma=False):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {normalization!r}")
        if normalization == "RMSNorm" and bias is not None:
            raise ValueError("RMSNorm has no bias")
        ctx.sink, ctx.zero_centered = sink, zero_centered_gamma
        ctx.has_bias, ctx.bias_dtype = bias is not None, bias.dtype if bias is not None else None
        with torch.no_grad():
            gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
            beta = bias.float() if bias is not None else None
            out, mean, rstd = _forward(x, gamma, beta, normalization, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dy):  # [s, b, h]
        x, weight, mean, rstd = ctx.saved_tensors
        dgamma_i, dbeta_i = norm_param_sample_grads(dy, x, mean, rstd, ctx.has_bias)  # [b, h]
        gamma = weight.float() + 1 if ctx.zero_centered else weight.float()
        dx = _input_grad(dy if dy.dtype == x.dtype else dy.to(x.dtype), x, gamma, mean, rstd)
        if ctx.sink is not None:
            ctx.sink(dgamma_i if dbeta_i is None else torch.cat([dgamma_i, dbeta_i], dim=-1))
        grad_bias = dbeta_i.sum(0).to(ctx.bias_dtype) if dbeta_i is not None else None
        return dx, dgamma_i.sum(0).to(weight.dtype), grad_bias, None, None, None, None

