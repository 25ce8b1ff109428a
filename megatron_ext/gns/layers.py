"""GNS-aware megatron-core layers: their backward also yields per-sample gradient norms.

Main API (plug the classes into `megatron_ext.model.layer_spec.get_gpt_layer_spec`):
    GNSColumnParallelLinear, GNSRowParallelLinear   subclasses of megatron-core's layers
    GNSNorm                                          subclass of `SPNorm`
    gns_layer_spec_kwargs() -> dict(column_linear=..., row_linear=..., norm=...)
    gns_layer_classes() -> ((GNSColumnParallelLinear, GNSRowParallelLinear), GNSNorm)

Each layer is inert (runs megatron-core's own code path, zero overhead) until a
`GNSTracker` attached to it is measuring a step with the per-sample estimator. Then its
forward takes the micro-batch index from the tracker and its backward reports what the
tracker needs to build Σ_params ‖g_i‖² for every sample i (McCandlish et al. 2018, App. A):

* linear weights: the fused kernel `wgrad_sample_norms` computes dW (the only dW; into
  `main_grad` under gradient-accumulation fusion) and ‖dW_i‖² of the local shard. TP
  shards of a weight are disjoint pieces of it, so these partial squared norms add up over
  the TP group ("additive" report).
* biases: per-sample ‖db_i‖² from the output grad. A column-parallel bias is sharded
  (additive). A row-parallel bias is added after the TP reduction: without SP every TP
  rank holds the same full copy (counted once, on TP rank 0); with SP each rank only saw
  its s/t tokens, so the per-sample *vectors* db_i [b, h] are summed over TP before
  squaring (‖Σ_r v_r‖² ≠ Σ_r ‖v_r‖²).
* norm γ/β (`GNSNorm`): same rule as the row-parallel bias (SP: vectors, else duplicate).

Bias with `skip_bias_add=True` (Megatron adds it later, in bias-dropout-add or the MLP
activation): its per-sample gradient equals the per-sample token sum of the grad of the
linear's output, because the consumer adds the bias exactly once to that output
(x + b, gelu(x + b), swiglu(x + b) all give d/db = d/dx). We read it off an identity
autograd node on the output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    dist_all_gather_func,
    dist_reduce_scatter_func,
)
from megatron.core.parallel_state import get_global_memory_buffer
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from megatron_ext.kernels import wgrad_sample_norms
from megatron_ext.model.norms import SPNorm

from .norm_grads import per_sample_norm_grads



def _tracker_mb(module) -> Optional[int]:
    """Micro-batch index of this forward if the module's tracker is measuring, else None."""
    tracker = getattr(module, "gns_tracker", None)
    if tracker is None:
        return None
    return tracker.microbatch_index(module)


# ----------------------------------------------------------------------------- linear
class _LinearWithSampleNormsTP(torch.autograd.Function):
    """megatron's LinearWithGradAccumulationAndAsyncCommunication, dW by the fused kernel.

    Same communication as Megatron: with SP the [s/t, b, h] input is all-gathered in
    forward and again in backward (only the local shard is saved), dgrad is
    reduce-scattered; without SP and with `allreduce_dgrad` dgrad is all-reduced.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, fuse, allreduce_dgrad, sequence_parallel, tp_group, sink,
                after_wgrad=None):
        ctx.save_for_backward(input, weight)
        ctx.after_wgrad = after_wgrad
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.fuse = bool(fuse) and hasattr(weight, "main_grad")
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        ctx.sink = sink
        total_input = _gather_sp(input, tp_group)[0] if sequence_parallel else input  # [s, b, h]
        output = torch.matmul(total_input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):  # [s, b, d_out]
        input, weight = ctx.saved_tensors
        tp_group = ctx.tp_group
        gather = None
        total_input = input
        if ctx.sequence_parallel:  # re-gather the input while dgrad runs (like Megatron)
            total_input, gather = _gather_sp(input, tp_group, async_op=True)
        grad_input = grad_output.matmul(weight)  # [s, b, d_in]
        if gather is not None:
            gather.wait()
        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
        if ctx.sequence_parallel:
            sub_grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            handle = dist_reduce_scatter_func(sub_grad_input, grad_input.contiguous(),
                                              group=tp_group, async_op=True)
        dy = grad_output if grad_output.dtype == total_input.dtype else grad_output.to(total_input.dtype)
        main_grad = weight.main_grad if ctx.fuse else None
        # The only weight-gradient GEMM of this layer: dW (+ db) and ‖dW_i‖², ‖db_i‖².
        res = wgrad_sample_norms(total_input, dy, "sbh", main_grad=main_grad,
                                 compute_bias=ctx.has_bias)
        sq = res.sq_norms_weight
        if ctx.has_bias:
            sq = sq + res.sq_norms_bias
        ctx.sink(sq)
        if ctx.after_wgrad is not None:  # e.g. the tied-embedding cross term (embedding.py)
            ctx.after_wgrad(total_input, dy)
        grad_weight = None
        if ctx.fuse:
            if hasattr(weight, "grad_added_to_main_grad"):
                # Megatron's placeholder so DDP hooks still run on the main thread.
                make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                grad_weight = make(weight.main_grad.shape, dtype=input.dtype, device=input.device)
                weight.grad_added_to_main_grad = True
        else:
            grad_weight = res.grad_weight.to(weight.dtype)
        grad_bias = res.grad_bias.to(ctx.bias_dtype) if ctx.has_bias else None
        if handle is not None:
            handle.wait()
        if ctx.sequence_parallel:
            grad_input = sub_grad_input
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _gather_sp(input: torch.Tensor, tp_group, async_op: bool = False):
    """All-gather the sequence-parallel [s/t, b, h] input into Megatron's shared buffer.

    Returns (buffer [s, b, h], work handle or None).
    """
    size = list(input.size())
    size[0] *= tp_group.size()
    buf = get_global_memory_buffer().get_tensor(size, input.dtype, "mpu")
    handle = dist_all_gather_func(buf, input.contiguous(), group=tp_group, async_op=async_op)
    return buf, handle


class _BiasSampleNorms(torch.autograd.Function):
    """Identity whose backward reports per-sample bias grads Σ_t dy[t, i] ([b, h])."""

    @staticmethod
    def forward(ctx, out, report):
        ctx.report = report
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dy):  # [s, b, h]
        ctx.report(dy.sum(0, dtype=torch.float32))  # [b, h]
        return dy, None


def _report_vectors(tracker, mb: int, mode: str) -> Callable[[torch.Tensor], None]:
    """How per-sample gradient vectors [b, h] of a parameter reach the tracker.

    mode "sharded": the local piece of a TP-sharded parameter (squares add over TP);
    "duplicated": every TP rank holds the full, identical grad (count once);
    "sequence_parallel": per-rank token partials (sum the vectors over TP, then square).
    """
    if mode == "sequence_parallel":
        return lambda v: tracker.add_grad_vectors(mb, v)
    dup = mode == "duplicated"
    return lambda v: tracker.add_sq_norms(mb, v.square().sum(-1), tp_duplicated=dup)


def _linear_impl(module, mb, input, weight, bias, gradient_accumulation_fusion,
                 allreduce_dgrad, sequence_parallel, tp_group=None, grad_output_buffer=None,
                 after_wgrad=None, **_unused):
    if grad_output_buffer is not None:
        raise ValueError("--gns does not support defer_embedding_wgrad_compute; turn it off")
    tracker = module.gns_tracker
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    sink = lambda sq: tracker.add_sq_norms(mb, sq)  # noqa: E731  (sharded: additive)
    return _LinearWithSampleNormsTP.apply(input, weight, bias, gradient_accumulation_fusion,
                                          allreduce_dgrad, sequence_parallel, tp_group, sink,
                                          after_wgrad)


class GNSColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear that reports per-sample squared grad norms to its tracker."""

    gns_tracker = None  # set by GNSTracker

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = _tracker_mb(self)
        if mb is None or not weight.requires_grad or input.dim() != 3 or self.explicit_expert_comm:
            return super()._forward_impl(input, weight, *args, **kwargs)
        out = _linear_impl(self, mb, input, weight, *args, **kwargs)  # [s, b, d_out/t]
        if self.skip_bias_add and self.bias is not None and self.bias.requires_grad:
            # The bias is sharded like the output columns: additive over TP.
            out = _BiasSampleNorms.apply(out, _report_vectors(self.gns_tracker, mb, "sharded"))
        return out


class GNSRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that reports per-sample squared grad norms to its tracker."""

    gns_tracker = None  # set by GNSTracker

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = _tracker_mb(self)
        if mb is None or not weight.requires_grad or input.dim() != 3 or self.explicit_expert_comm:
            return super()._forward_impl(input, weight, *args, **kwargs)
        self._gns_mb = mb  # the bias hook in forward() uses the same micro-batch
        return _linear_impl(self, mb, input, weight, *args, **kwargs)

    def forward(self, input_):
        self._gns_mb = None
        output, output_bias = super().forward(input_)  # output: [s(/t), b, h]
        mb = self._gns_mb
        if mb is not None and self.bias is not None and self.bias.requires_grad:
            # d(output) == d(output_ + b) == the bias's per-token grad, whether Megatron
            # added b here (skip_bias_add=False) or bias-dropout-add will (True).
            mode = ("sequence_parallel" if self.sequence_parallel
                    else "duplicated" if self.tp_group.size() > 1 else "sharded")
            output = _BiasSampleNorms.apply(output, _report_vectors(self.gns_tracker, mb, mode))
        return output, output_bias


# ----------------------------------------------------------------------------- norm
class _NormWithSampleNorms(torch.autograd.Function):
    """LayerNorm/RMSNorm (fp32 math, like `SPNorm`) whose backward reports per-sample γ/β grads.

    Saves the input in its own dtype plus the per-token mean/rstd (no fp32 [s, b, h] copy);
    backward gets dγ_i, dβ_i from one fused pass (`norm_grads.per_sample_norm_grads`) and
    dx from ATen's layer-norm backward (RMSNorm: the closed form), so γ/β grads are the
    per-sample sums, never computed twice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, norm, report):
        ctx.norm, ctx.report, ctx.has_bias = norm, report, bias is not None
        h = x.shape[-1]
        with torch.no_grad():
            x32 = x.float()  # [s, b, h]
            gamma = norm._gamma32(weight)
            if norm.normalization == "LayerNorm":
                out, mean, rstd = torch.native_layer_norm(
                    x32, [h], gamma, bias.float() if bias is not None else None, norm.eps)
            else:
                mean = None
                rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)  # [s, b, 1]
                out = x32 * rstd * gamma
        ctx.save_for_backward(x, weight, mean, rstd)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # [s, b, h]
        x, weight, mean, rstd = ctx.saved_tensors
        norm = ctx.norm
        dgamma_i, dbeta_i = per_sample_norm_grads(dy, x, mean, rstd, ctx.has_bias)  # [b, h]
        gamma = norm._gamma32(weight)
        x32, dy32 = x.float(), dy.float()
        if norm.normalization == "LayerNorm":
            dx = torch.ops.aten.native_layer_norm_backward(
                dy32, x32, [x.shape[-1]], mean, rstd, gamma, None, [True, False, False])[0]
        else:
            xhat = x32 * rstd
            dxhat = dy32 * gamma
            dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        vecs = [dgamma_i] if dbeta_i is None else [dgamma_i, dbeta_i]
        ctx.report(torch.cat(vecs, dim=-1))  # [b, h or 2h]; d(1+w) = dw for zero-centred γ
        grad_bias = dbeta_i.sum(0).to(weight.dtype) if dbeta_i is not None else None
        return dx.to(x.dtype), dgamma_i.sum(0).to(weight.dtype), grad_bias, None, None


class GNSNorm(SPNorm):
    """`SPNorm` that reports per-sample squared grad norms of γ (and β) to its tracker."""

    gns_tracker = None  # set by GNSTracker

    def _gamma32(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + 1 if self.zero_centered_gamma else weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mb = _tracker_mb(self) if self.weight.requires_grad else None
        if mb is None:
            return super().forward(x)
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        sp = bool(getattr(self.weight, "sequence_parallel", False)) and tp > 1
        mode = "sequence_parallel" if sp else "duplicated" if tp > 1 else "sharded"
        return _NormWithSampleNorms.apply(x, self.weight, self.bias, self,
                                          _report_vectors(self.gns_tracker, mb, mode))


def gns_layer_spec_kwargs() -> dict:
    """Keyword arguments of `get_gpt_layer_spec` (and `norm=` of `get_gpt_block_spec`)."""
    return {"column_linear": GNSColumnParallelLinear, "row_linear": GNSRowParallelLinear,
            "norm": GNSNorm}


def gns_layer_classes():
    """((column_linear, row_linear), norm) of the GNS layers, for a model builder."""
    return (GNSColumnParallelLinear, GNSRowParallelLinear), GNSNorm
