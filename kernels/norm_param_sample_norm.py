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
    def _kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dg_ptr, db_ptr, S, H, chunk,
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
    xhat = (x32 - mean) * rstd if mean is not None else x32 * rstd  # [s, b, h]
    dy32 = dy.float()
    return (dy32 * xhat).sum(0), (dy32.sum(0) if has_beta else None)  # [b, h]


def _split_tokens(s: int, b: int, n_h: int, block_s: int, device) -> int:
    """Token chunk per program, so that even one sample fills the GPU."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    n_split = max(1, min(triton.cdiv(s, block_s), triton.cdiv(4 * sms, b * n_h)))
    return triton.cdiv(triton.cdiv(s, n_split), block_s) * block_s


def norm_param_sample_grads(dy: torch.Tensor, x: torch.Tensor, mean: Optional[torch.Tensor],
                            rstd: torch.Tensor, has_beta: bool
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dγ_i and dβ_i ([b, h] fp32) of every sample.

    dy, x: [s, b, h] (any float dtype); mean (LayerNorm, else None) / rstd: [s, b] or
    [s, b, 1] fp32 per-token statistics of the forward.
    """
    if norm_param_backend(dy) == "torch-reference" or dy.numel() == 0:
        return norm_param_sample_grads_reference(dy, x, mean, rstd, has_beta)
    s, b, h = dy.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    rstd = rstd.reshape(s, b).float().contiguous()
    mean_t = mean.reshape(s, b).float().contiguous() if mean is not None else rstd
    dg = torch.zeros(b, h, dtype=torch.float32, device=dy.device)
    db = torch.zeros(b, h, dtype=torch.float32, device=dy.device) if has_beta else dg
    block_h, block_s = min(128, triton.next_power_of_2(h)), 32
    n_h = triton.cdiv(h, block_h)
    chunk = _split_tokens(s, b, n_h, block_s, dy.device)
    _kernel[(b, n_h, triton.cdiv(s, chunk))](
        dy, x, mean_t, rstd, dg, db, s, h, chunk,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), rstd.stride(0), rstd.stride(1),
        HAS_MEAN=mean is not None, HAS_BETA=has_beta, BLOCK_S=block_s, BLOCK_H=block_h)
    return dg, (db if has_beta else None)


def _forward_fp32(x32, gamma, beta, normalization: str, eps: float):
    """(y, mean or None, rstd) in fp32; the same ops as `megatron_ext.model.norms.SPNorm`."""
    if normalization == "LayerNorm":
        return torch.native_layer_norm(x32, [x32.shape[-1]], gamma, beta, eps)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [s, b, 1]
    return x32 * rstd * gamma, None, rstd


def _input_grad(dy32, x32, gamma, mean, rstd):
    """dx in fp32: ATen's layer-norm backward, or RMSNorm's closed form (mean is None)."""
    if mean is not None:
        return torch.ops.aten.native_layer_norm_backward(
            dy32, x32, [x32.shape[-1]], mean, rstd, gamma, None, [True, False, False])[0]
    xhat, dxhat = x32 * rstd, dy32 * gamma
    return rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))


class NormWithSampleNorms(torch.autograd.Function):
    """LayerNorm/RMSNorm over the last dim, fp32 math, output in x's dtype.

    Args of `apply`: x [s, b, h]; weight γ [h] (stored γ - 1 if `zero_centered_gamma`);
    bias β [h] or None; sink: callable taking the fp32 per-sample vectors [b, h] (dγ_i)
    or [b, 2h] (dγ_i, dβ_i), or None; normalization "LayerNorm" | "RMSNorm"; eps.
    Saves x in its own dtype plus the per-token mean/rstd (no fp32 [s, b, h] copy); the
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
            out, mean, rstd = _forward_fp32(x.float(), gamma, beta, normalization, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # [s, b, h]
        x, weight, mean, rstd = ctx.saved_tensors
        dgamma_i, dbeta_i = norm_param_sample_grads(dy, x, mean, rstd, ctx.has_bias)  # [b, h]
        gamma = weight.float() + 1 if ctx.zero_centered else weight.float()
        dx = _input_grad(dy.float(), x.float(), gamma, mean, rstd)
        if ctx.sink is not None:
            ctx.sink(dgamma_i if dbeta_i is None else torch.cat([dgamma_i, dbeta_i], dim=-1))
        grad_bias = dbeta_i.sum(0).to(ctx.bias_dtype) if dbeta_i is not None else None
        return dx.to(x.dtype), dgamma_i.sum(0).to(weight.dtype), grad_bias, None, None, None, None

