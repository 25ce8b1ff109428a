"""Linear layer autograd function that reports per-sample squared gradient norms.

Main API:
    LinearWithSampleNorms.apply(x, weight, bias, norm_sink, layout="sbh",
                                gradient_accumulation_fusion=False) -> y
    linear_with_sample_norms(...)            keyword-friendly wrapper of the above
    SampleNormAccumulator                    a ready-made `norm_sink`

Forward is y = x Wᵀ (+ b). Backward computes dx = dy W with a plain torch matmul and
dW (+ db) with the fused Triton kernel of `wgrad_sample_norm`, which also yields
n[i] = ‖dW_i‖² + ‖db_i‖² for every sample i at almost no cost; `norm_sink(n)` is called
once per backward with that fp32 [b] tensor. A GNS layer sums these sinks over all
layers to get Σ_params ‖g_i‖² for the small-batch side of the gradient-noise-scale
estimator (McCandlish et al. 2018, App. A).

Tensor-parallel communication is deliberately not handled here: a TP wrapper gathers /
reduces around this function (under TP each rank sees its weight shard, so its norms are
partial sums that add up across ranks).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .wgrad_sample_norm import wgrad_sample_norms

NormSink = Callable[[torch.Tensor], None]


class SampleNormAccumulator:
    """Callable norm sink that sums every reported [b] tensor into `self.total`.

    Use one per model (or per micro-batch): `sink = SampleNormAccumulator()`, pass it to
    every layer, run backward, read `sink.total` ([b] fp32), then `sink.reset()`.
    """

    def __init__(self) -> None:
        self.total: Optional[torch.Tensor] = None  # [b] fp32
        self.num_calls = 0  # how many layers reported since the last reset

    def __call__(self, sq_norms: torch.Tensor) -> None:
        sq_norms = sq_norms.detach().float()
        if self.total is None:
            self.total = sq_norms.clone()
        else:
            self.total.add_(sq_norms)
        self.num_calls += 1

    def reset(self) -> None:
        self.total = None
        self.num_calls = 0


def _dummy_wgrad(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Megatron's convention when dW went straight into main_grad: hand autograd a
    # placeholder so DDP hooks still fire on the main thread (see megatron-core
    # tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication).
    shape, dev = weight.main_grad.shape, weight.main_grad.device
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(shape, dtype=dtype, device=dev)
    return torch.empty(shape, dtype=dtype, device=dev)


class LinearWithSampleNorms(torch.autograd.Function):
    """y = x Wᵀ + b whose backward also reports per-sample squared grad norms.

    Args of `apply` (positional, autograd.Function style):
        x: [s, b, d_in] ("sbh", Megatron) or [b, s, d_in] ("bsh").
        weight: [d_out, d_in]. When `gradient_accumulation_fusion` is True and the weight
            has a fp32 `main_grad` attribute, dW is added into it in place and the
            returned grad is Megatron's placeholder (or None, see `_dummy_wgrad`).
        bias: [d_out] or None; its per-sample norms are included in what the sink gets.
        norm_sink: callable taking a [b] fp32 tensor, or None (norms are then dropped).
        layout: "sbh" or "bsh".
        gradient_accumulation_fusion: accumulate dW into `weight.main_grad`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, norm_sink, layout="sbh", gradient_accumulation_fusion=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.norm_sink = norm_sink
        ctx.layout = layout
        ctx.fuse = bool(gradient_accumulation_fusion) and hasattr(weight, "main_grad")
        return F.linear(x, weight, bias)  # [s, b, d_out]

    @staticmethod
    def backward(ctx, dy):  # dy: [s, b, d_out]
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dy.matmul(weight) if need_dx else None  # [s, b, d_in]
        grad_w = grad_b = None
        if need_dw or need_db or ctx.norm_sink is not None:
            if dy.dtype != x.dtype:
                dy = dy.to(x.dtype)
            main_grad = weight.main_grad if (ctx.fuse and need_dw) else None
            res = wgrad_sample_norms(
                x, dy, ctx.layout, main_grad=main_grad, compute_bias=ctx.has_bias
            )
            if ctx.norm_sink is not None:
                sq = res.sq_norms_weight
                if ctx.has_bias:
                    sq = sq + res.sq_norms_bias
                ctx.norm_sink(sq)
            if need_dw:
                if ctx.fuse:
                    if hasattr(weight, "grad_added_to_main_grad"):
                        grad_w = _dummy_wgrad(weight, x.dtype)
                        weight.grad_added_to_main_grad = True
                else:
                    grad_w = res.grad_weight.to(weight.dtype)
            if need_db and ctx.has_bias:
                grad_b = res.grad_bias.to(ctx.bias_dtype)
        return dx, grad_w, grad_b, None, None, None


def linear_with_sample_norms(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    norm_sink: Optional[NormSink] = None,
    *,
    layout: str = "sbh",
    gradient_accumulation_fusion: bool = False,
) -> torch.Tensor:
    """Keyword-friendly wrapper of `LinearWithSampleNorms.apply`."""
    return LinearWithSampleNorms.apply(x, weight, bias, norm_sink, layout, gradient_accumulation_fusion)
