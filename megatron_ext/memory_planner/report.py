"""The memory planner's report of one job: one text for the CLI and for ``--plan-memory``.

Main API: `plan_report(model, layout, config) -> str`, `attention_kind(backend)` and
`describe_layout(layout)`.

Both entry points (`python -m megatron_ext.memory_planner ...` and
`examples/pretrain_gpt.py ... --plan-memory`) build a `ModelShape` and a `ParallelLayout` from
the same flags and print this report, so they cannot disagree. The ranking of layouts keeps
what was requested (attention backend, recompute method and layers, the model's vocab,
SwiGLU, GQA: the model is the requested one) and always contains the requested layout when it
fits, marked "(requested)".
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

from ..cost_model import ModelShape
from .config import MemoryPlannerConfig
from .estimate import GIB, estimate_memory, expandable_segments_enabled
from .search import best_config, longest_sequence, max_micro_batch_size, relative_cost
from .shapes import ParallelLayout

# --attention-backend values that materialise the s x s scores (megatron-core's local
# DotProductAttention); flash/sdpa/auto/fused never store them.
LOCAL_BACKENDS = ("local", "unfused")
RANKED_SHOWN = 5


def attention_kind(backend: str) -> str:
    """The planner's attention kind ("local" or "flash") of an --attention-backend value."""
    return "local" if backend in LOCAL_BACKENDS else "flash"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def describe_layout(layout: ParallelLayout) -> str:
    rec = layout.recompute_granularity or "none"
    if rec == "full":
        rec += f"/{layout.recompute_method}/{layout.recompute_num_layers}"
    return (f"tp={layout.tp} pp={layout.pp} cp={layout.cp} dp={layout.dp} "
            f"sp={int(layout.sp)} mbs={layout.micro_batch_size} m={layout.num_microbatches} "
            f"recompute={rec} dist-opt={int(layout.distributed_optimizer)} "
            f"attention={layout.attention}")


def _header(model: ModelShape, layout: ParallelLayout, cfg: MemoryPlannerConfig) -> List[str]:
    tp = layout.tp
    return [f"model: {model.num_params(tp) / 1e9:.3f}B params, "
            f"{model.flops_per_sample(tp) / 1e12:.1f} TFLOP/sample (fwd+bwd), "
            f"{model.num_layers} layers, h={model.hidden_size}, "
            f"heads={model.num_attention_heads}/{model.num_query_groups} groups, "
            f"s={model.seq_length}, vocab={model.padded_vocab(tp)} (padded), "
            f"swiglu={int(model.swiglu)}, dropout={int(model.dropout)}, "
            f"attention={layout.attention}",
            f"GPU memory {cfg.gpu_memory_gb:g} GiB, overhead {cfg.memory_overhead_gb:g} GiB, "
            f"fragmentation x{cfg.memory_fragmentation:g} or one largest transient block "
            f"({'off: expandable segments' if expandable_segments_enabled() else 'on'})", ""]


def _recompute_variants(model, layout, cfg) -> List[str]:
    """The requested layout with each recompute granularity (the requested one marked)."""
    kw, cap, out = cfg.estimate_kwargs(), cfg.gpu_memory_bytes, []
    for gran in (None, "selective", "full"):
        lay = replace(layout, recompute_granularity=gran)
        est = estimate_memory(model, lay, **kw)
        mark = "fits" if est.total <= cap else "DOES NOT FIT"
        chosen = " (requested)" if gran == layout.recompute_granularity else ""
        out += [f"[{describe_layout(lay)}]{chosen}: {_gib(est.total)} -> {mark}",
                est.as_table(),
                f"  max micro-batch: {max_micro_batch_size(model, lay, cap, **kw)}, "
                f"longest sequence: {longest_sequence(model, lay, cap, **kw)} tokens, "
                f"relative cost {relative_cost(model, lay):.3f}", ""]
    return out


def _ranking(model, layout, cfg) -> List[str]:
    world = layout.world_size
    gbs = layout.dp * layout.micro_batch_size * layout.num_microbatches
    ranked = best_config(model, world, cfg.gpu_memory_bytes, gbs, requested=layout,
                         **cfg.estimate_kwargs())
    if not ranked:
        return [f"no layout of {world} GPU(s) fits in {cfg.gpu_memory_gb:g} GiB at "
                f"s={model.seq_length}, global batch {gbs}: add GPUs (--world-size) or "
                "context parallelism, or shorten the sequence"]
    out = [f"fastest fitting layouts on {world} GPU(s), global batch {gbs} "
           f"(attention={layout.attention}; {len(ranked)} fit):"]
    pos = next((i for i, r in enumerate(ranked) if r[0] == layout), None)
    for i, (lay, est, cost) in enumerate(ranked):
        if i < RANKED_SHOWN or i == pos:
            mark = f"  (requested, #{i + 1})" if i == pos else ""
            out.append(f"  cost {cost:.3f}  peak {_gib(est.total):>10}  "
                       f"{describe_layout(lay)}{mark}")
    if pos is None:
        out.append("  the requested layout does not fit")
    return out


def plan_report(model: ModelShape, layout: ParallelLayout, cfg: MemoryPlannerConfig) -> str:
    """The full report: header, the requested layout under each recompute granularity,
    and the ranking of the layouts that fit on `layout.world_size` GPUs."""
    lines = _header(model, layout, cfg) + _recompute_variants(model, layout, cfg)
    return "\n".join(lines + _ranking(model, layout, cfg))


__all__ = ["LOCAL_BACKENDS", "attention_kind", "describe_layout", "plan_report"]
