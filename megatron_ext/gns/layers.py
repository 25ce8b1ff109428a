"""GNS-aware megatron-core layers: their backward also yields per-sample gradient norms.

Main API:
    gns_layer_specs(recorder) -> dict(column_linear=..., row_linear=..., norm=...)
        ModuleSpecs for `megatron_ext.model.layer_spec.get_gpt_layer_spec(**specs)` and
        `get_gpt_block_spec(config, layer_spec, norm=specs["norm"])`
    GNSColumnParallelLinear, GNSRowParallelLinear   subclasses of megatron-core's layers
    GNSNorm                                          subclass of `SPNorm`
    tracked_parameters(model_chunks, recorder) -> parameters of the recorder's layers

Each layer takes a `recorder` keyword argument (given through the ModuleSpec's params; in
training the `GNSTracker`) and is inert (megatron-core's own code path, zero overhead)
unless `recorder.microbatch_index(layer)` returns a micro-batch index. Then its backward
reports what the recorder needs to build Σ_params ‖g_i‖² for every sample i (McCandlish
et al. 2018, App. A):

* linear weights: `megatron_ext.kernels.LinearWithSampleNorms` computes dW (the only dW;
  into `main_grad` under gradient-accumulation fusion) and ‖dW_i‖² of the local shard, by
  the route `gns.routes` picks for the shape (fused kernel, ghost norms or batched product). TP shards of a weight are disjoint pieces of it, so these partial squared
  norms add up over the TP group ("sharded" report).
* biases: per-sample ‖db_i‖² from the output grad. A column-parallel bias is sharded. A
  row-parallel bias is added after the TP reduction: without SP every TP rank holds the same
  full copy (counted once, on TP rank 0: "duplicated"); with SP each rank only saw its s/t
  tokens, so the per-sample *vectors* db_i [b, h] are summed over TP before squaring
  (‖Σ_r v_r‖² ≠ Σ_r ‖v_r‖²).
* norm γ/β (`GNSNorm`, `megatron_ext.kernels.NormWithSampleNorms`): same rule as the
  row-parallel bias.

Bias with `skip_bias_add=True` (Megatron adds it later, in bias-dropout-add or the MLP
activation): its per-sample gradient equals the per-sample token sum of the grad of the
linear's output, because the consumer adds the bias exactly once to that output
(x + b, gelu(x + b), swiglu(x + b) all give d/db = d/dx). We read it off an identity
autograd node on the output.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import torch

from megatron.core.parallel_state import get_global_memory_buffer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.kernels import LinearWithSampleNorms, NormWithSampleNorms, TensorParallelComm
from megatron_ext.model.norms import SPNorm

from .routes import linear_route


def _microbatch(module) -> Optional[int]:
    """Micro-batch index of this forward if the module's recorder is measuring, else None."""
    recorder = module.gns_recorder
    return None if recorder is None else recorder.microbatch_index(module)


def _megatron_buffer(shape: List[int], dtype: torch.dtype) -> torch.Tensor:
    # The SP all-gather lands in Megatron's shared buffer, like Megatron's own linear.
    return get_global_memory_buffer().get_tensor(shape, dtype, "mpu")


# ----------------------------------------------------------------------------- linear
def gns_linear(module, mb, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
               sequence_parallel, grad_output_buffer=None, after_wgrad=None, **_unused):
    """`_forward_impl` of a measured linear: Megatron's arguments, the fused-norm kernel."""
    if grad_output_buffer is not None:
        raise ValueError("--gns does not support defer_embedding_wgrad_compute; turn it off")
    tp = TensorParallelComm(module.tp_group, sequence_parallel=sequence_parallel,
                            allreduce_dgrad=allreduce_dgrad, buffer=_megatron_buffer)
    sink = functools.partial(module.gns_recorder.add_sq_norms, mb)  # sharded: additive
    # fused kernel, or torch dW + ghost / batched norms: the fastest for this shape (routes.py)
    route = linear_route(module.gns_recorder, input, weight, sequence_parallel, module.tp_group)
    return LinearWithSampleNorms.apply(input, weight, bias, sink, "sbh",
                                       gradient_accumulation_fusion, tp, after_wgrad, route)


def measured_microbatch(module, input, weight) -> Optional[int]:
    """The micro-batch a linear's forward measures, or None for Megatron's own path."""
    if not weight.requires_grad or input.dim() != 3 or module.explicit_expert_comm:
        return None
    return _microbatch(module)


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


def _report_vectors(recorder, mb: int, mode: str) -> Callable[[torch.Tensor], None]:
    """How per-sample gradient vectors [b, h] of a parameter reach the recorder.

    mode "sharded": the local piece of a TP-sharded parameter (squares add over TP);
    "duplicated": every TP rank holds the full, identical grad (count once);
    "sequence_parallel": per-rank token partials (sum the vectors over TP, then square).
    """
    if mode == "sequence_parallel":
        return functools.partial(recorder.add_grad_vectors, mb)
    dup = mode == "duplicated"
    return lambda v: recorder.add_sq_norms(mb, v.square().sum(-1), tp_duplicated=dup)


class GNSColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear that reports per-sample squared grad norms to its recorder."""

    def __init__(self, *args, recorder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gns_recorder = recorder

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = measured_microbatch(self, input, weight)
        if mb is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        out = gns_linear(self, mb, input, weight, *args, **kwargs)  # [s, b, d_out/t]
        if self.skip_bias_add and self.bias is not None and self.bias.requires_grad:
            # The bias is sharded like the output columns: additive over TP.
            out = _BiasSampleNorms.apply(out, _report_vectors(self.gns_recorder, mb, "sharded"))
        return out


class GNSRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that reports per-sample squared grad norms to its recorder."""

    def __init__(self, *args, recorder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gns_recorder = recorder
        self._gns_mb = None

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = measured_microbatch(self, input, weight)
        if mb is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        self._gns_mb = mb  # the bias hook in forward() uses the same micro-batch
        return gns_linear(self, mb, input, weight, *args, **kwargs)

    def forward(self, input_):
        self._gns_mb = None
        output, output_bias = super().forward(input_)  # output: [s(/t), b, h]
        mb = self._gns_mb
        if mb is not None and self.bias is not None and self.bias.requires_grad:
            # d(output) == d(output_ + b) == the bias's per-token grad, whether Megatron
            # added b here (skip_bias_add=False) or bias-dropout-add will (True).
            mode = "sequence_parallel" if self.sequence_parallel else "duplicated"
            output = _BiasSampleNorms.apply(output, _report_vectors(self.gns_recorder, mb, mode))
        return output, output_bias


# ----------------------------------------------------------------------------- norm
class GNSNorm(SPNorm):
    """`SPNorm` that reports per-sample γ (and β) gradient vectors to its recorder."""

    def __init__(self, *args, recorder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gns_recorder = recorder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mb = _microbatch(self) if self.weight.requires_grad else None
        if mb is None:
            return super().forward(x)
        # SP: each TP rank normalised its token share (sum vectors over TP); else every TP
        # rank holds the same full grads (count once; also right without TP).
        sp = bool(getattr(self.weight, "sequence_parallel", False))
        report = _report_vectors(self.gns_recorder, mb, "sequence_parallel" if sp else "duplicated")
        return NormWithSampleNorms.apply(x, self.weight, self.bias, report, self.normalization,
                                         self.eps, self.zero_centered_gamma)


# ----------------------------------------------------------------------------- specs
def gns_layer_specs(recorder) -> dict:
    """Keyword arguments of `get_gpt_layer_spec` (and `norm=` of `get_gpt_block_spec`).

    megatron-core 0.16.1 builds every slot these fill through `build_module` (or, for
    linear_qkv, by calling the spec, which does the same), passing the params along.
    """
    params = {"recorder": recorder}
    return {"column_linear": ModuleSpec(module=GNSColumnParallelLinear, params=params),
            "row_linear": ModuleSpec(module=GNSRowParallelLinear, params=params),
            "norm": ModuleSpec(module=GNSNorm, params=params)}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def tracked_parameters(model_chunks: Sequence[torch.nn.Module], recorder) -> list:
    """Trainable parameters of the modules whose `gns_recorder` is `recorder`, each once.

    MoE expert linears run megatron's own path (no per-sample norms): not tracked.
    """
    if recorder is None:
        raise ValueError("tracked_parameters needs the recorder the GNS layers were built with")
    params, seen = [], set()
    for chunk in model_chunks:
        for m in _unwrap(chunk).modules():
            if getattr(m, "gns_recorder", None) is not recorder or getattr(m, "is_expert", False):
                continue
            for p in m.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params
