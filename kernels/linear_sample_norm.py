"""Linear layer autograd function that reports per-sample squared gradient norms.

Main API:
    LinearWithSampleNorms.apply(x, weight, bias, norm_sink, layout="sbh",
                                gradient_accumulation_fusion=False, tp=None,
                                after_wgrad=None, route="fused") -> y
    linear_with_sample_norms(...)            keyword-friendly wrapper of the above
    TensorParallelComm(group, sequence_parallel=False, allreduce_dgrad=False, buffer=None)
    SampleNormAccumulator                    a ready-made `norm_sink`

Forward is y = x Wᵀ (+ b). Backward computes dx = dy W with a plain torch matmul and
dW (+ db) with the fused Triton kernel of `wgrad_sample_norm`, which also yields
n[i] = ‖dW_i‖² + ‖db_i‖² for every sample i at almost no cost (`route="fused"`), or with a
torch GEMM plus ghost norms / a batched per-sample product (`route="ghost"` / `"batched"`,
`wgrad_sample_norm_routes.py`; `megatron_ext.gns.routes` picks the fastest per shape);
`norm_sink(n)` is called
once per backward with that fp32 [b] tensor. Summed over all layers this is
Σ_params ‖g_i‖², the small-batch side of the gradient-noise-scale estimator
(McCandlish et al. 2018, App. A).

Tensor parallelism (`tp`, a `TensorParallelComm`) follows Megatron's
LinearWithGradAccumulationAndAsyncCommunication: with sequence parallelism the [s/t, b, h]
input is all-gathered in forward and again in backward (only the local shard is saved)
and dgrad is reduce-scattered; otherwise `allreduce_dgrad` all-reduces dgrad. Under TP each
rank holds a weight shard, so its norms are partial sums that add up over the TP group.
Only torch.distributed is used here; a caller can hand in a buffer getter (e.g. Megatron's
global memory buffer) for the gathered input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .wgrad_sample_norm_routes import wgrad_sample_norms_route

NormSink = Callable[[torch.Tensor], None]
AfterWgrad = Callable[[torch.Tensor, torch.Tensor], None]


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


@dataclass(frozen=True)
class TensorParallelComm:
    """How a tensor-parallel linear talks to its TP group (Megatron's conventions).

    group: the tensor-parallel process group.
    sequence_parallel: input is [s/t, b, h]: all-gather it (dim 0), reduce-scatter dgrad.
    allreduce_dgrad: all-reduce dgrad (column-parallel without sequence parallelism).
    buffer: buffer(shape, dtype) -> tensor receiving the gathered input (default: a new
        tensor); Megatron layers pass its global memory buffer, which later layers reuse.
    """

    group: "dist.ProcessGroup"
    sequence_parallel: bool = False
    allreduce_dgrad: bool = False
    buffer: Optional[Callable[[List[int], torch.dtype], torch.Tensor]] = None

    def gather(self, x: torch.Tensor, async_op: bool = False):
        """All-gather the [s/t, b, h] shards -> ([s, b, h], work handle or None)."""
        shape = list(x.shape)
        shape[0] *= dist.get_world_size(self.group)
        out = (self.buffer(shape, x.dtype) if self.buffer is not None
               else torch.empty(shape, dtype=x.dtype, device=x.device))
        handle = dist.all_gather_into_tensor(out, x.contiguous(), group=self.group,
                                             async_op=async_op)
        return out, handle

    def reduce_dgrad(self, grad_input: torch.Tensor, like: torch.Tensor):
        """Start dgrad's reduction; returns (tensor that will hold it, work handle)."""
        if self.sequence_parallel:  # [s, b, h] -> this rank's [s/t, b, h] sum
            out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            return out, dist.reduce_scatter_tensor(out, grad_input.contiguous(),
                                                   group=self.group, async_op=True)
        if self.allreduce_dgrad:
            return grad_input, dist.all_reduce(grad_input, group=self.group, async_op=True)
        return grad_input, None


def _dummy_wgrad(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Megatron's convention when dW went straight into main_grad: hand autograd a
    # placeholder so DDP hooks still fire on the main thread (see megatron-core
    # tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication).
    shape, dev = weight.main_grad.shape, weight.main_grad.device
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(shape, dtype=dtype, device=dev)
    return torch.empty(shape, dtype=dtype, device=dev)


def _weight_grads(ctx, total_input, dy, weight, need_dw, need_db):
    """dW (+ db) by the fused kernel, reports the norms; returns (grad_w, grad_b)."""
    if dy.dtype != total_input.dtype:
        dy = dy.to(total_input.dtype)
    main_grad = weight.main_grad if (ctx.fuse and need_dw) else None
    res = wgrad_sample_norms_route(ctx.route, total_input, dy, ctx.layout, main_grad=main_grad,
                                   compute_bias=ctx.has_bias)
    if ctx.norm_sink is not None:
        sq = res.sq_norms_weight
        ctx.norm_sink(sq + res.sq_norms_bias if ctx.has_bias else sq)  # [b]
    if ctx.after_wgrad is not None:  # e.g. the tied-embedding cross term (gns/embedding.py)
        ctx.after_wgrad(total_input, dy)
    grad_w = grad_b = None
    if need_dw:
        if not ctx.fuse:
            grad_w = res.grad_weight.to(weight.dtype)
        elif hasattr(weight, "grad_added_to_main_grad"):
            grad_w = _dummy_wgrad(weight, total_input.dtype)
            weight.grad_added_to_main_grad = True
    if need_db and ctx.has_bias:
        grad_b = res.grad_bias.to(ctx.bias_dtype)
    return grad_w, grad_b


class LinearWithSampleNorms(torch.autograd.Function):
    """y = x Wᵀ + b whose backward also reports per-sample squared grad norms.

    Args of `apply` (positional, autograd.Function style):
        x: [s, b, d_in] ("sbh", Megatron) or [b, s, d_in] ("bsh"); under sequence
            parallelism this rank's [s/t, b, d_in] ("sbh" only).
        weight: [d_out, d_in] (this rank's shard under TP). When
            `gradient_accumulation_fusion` is True and the weight has a fp32 `main_grad`,
            dW is added into it in place and the returned grad is Megatron's placeholder.
        bias: [d_out] or None; its per-sample norms are included in what the sink gets.
        norm_sink: callable taking a [b] fp32 tensor, or None (norms are then dropped).
        layout: "sbh" or "bsh".
        gradient_accumulation_fusion: accumulate dW into `weight.main_grad`.
        tp: a `TensorParallelComm`, or None (no communication).
        after_wgrad: optional callable(total_input, dy) run after dW in backward.
        route: "fused" (Triton kernel), "ghost" or "batched" (torch dW + separate norms).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, norm_sink, layout="sbh",
                gradient_accumulation_fusion=False, tp=None, after_wgrad=None, route="fused"):
        sp = tp is not None and tp.sequence_parallel
        if sp and layout != "sbh":
            raise ValueError("sequence parallelism needs the [s, b, h] layout ('sbh')")
        ctx.save_for_backward(x, weight)  # the local shard only (re-gathered in backward)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.norm_sink, ctx.layout, ctx.tp, ctx.after_wgrad = norm_sink, layout, tp, after_wgrad
        ctx.route = route
        ctx.fuse = bool(gradient_accumulation_fusion) and hasattr(weight, "main_grad")
        total_input = tp.gather(x)[0] if sp else x  # [s, b, d_in]
        return F.linear(total_input, weight, bias)  # [s, b, d_out]

    @staticmethod
    def backward(ctx, dy):  # dy: [s, b, d_out]
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        tp = ctx.tp
        total_input, gather = x, None
        if tp is not None and tp.sequence_parallel:  # re-gather while dgrad runs (Megatron)
            total_input, gather = tp.gather(x, async_op=True)
        dx = dy.matmul(weight) if need_dx else None  # [s, b, d_in]
        if gather is not None:
            gather.wait()
        handle = None
        if tp is not None and dx is not None:  # overlaps with the weight-gradient kernel
            dx, handle = tp.reduce_dgrad(dx, x)
        grad_w = grad_b = None
        if need_dw or need_db or ctx.norm_sink is not None:
            grad_w, grad_b = _weight_grads(ctx, total_input, dy, weight, need_dw, need_db)
        if handle is not None:
            handle.wait()
        return dx, grad_w, grad_b, None, None, None, None, None, None


def linear_with_sample_norms(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    norm_sink: Optional[NormSink] = None,
    *,
    layout: str = "sbh",
    gradient_accumulation_fusion: bool = False,
    tp: Optional[TensorParallelComm] = None,
    after_wgrad: Optional[AfterWgrad] = None,
    route: str = "fused",
) -> torch.Tensor:
    """Keyword-friendly wrapper of `LinearWithSampleNorms.apply`."""
    return LinearWithSampleNorms.apply(x, weight, bias, norm_sink, layout,
                                       gradient_accumulation_fusion, tp, after_wgrad, route)
