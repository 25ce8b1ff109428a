"""Searches over the memory model: largest micro-batch, longest sequence, and a ranking of
parallel layouts by a simple cost model.

Main API: `max_micro_batch_size`, `longest_sequence`, `best_config`, `relative_cost`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, List, Optional, Tuple

from ..cost_model import ModelShape
from .estimate import MemoryEstimate, estimate_memory
from .shapes import ParallelLayout

# Cost-model constants (heuristics, documented so they can be tuned against measurements).
TP_COMM_PER_DOUBLING = 0.08  # TP all-gather/reduce-scatter per layer, mostly not overlapped
CP_COMM_PER_DOUBLING = 0.04  # ring attention K/V exchange, largely overlapped with compute
DIST_OPT_PENALTY = 0.01      # extra param all-gather of the distributed optimizer


def _fits(model, layout, gpu_memory_bytes, **kw) -> bool:
    return estimate_memory(model, layout, **kw).total <= gpu_memory_bytes


def max_micro_batch_size(model: ModelShape, layout: ParallelLayout, gpu_memory_bytes: float,
                         limit: int = 64, **estimate_kw) -> int:
    """Largest micro-batch size <= limit whose estimate fits (0 if none fits)."""
    lo, hi = 0, int(limit)  # memory grows with the micro-batch: bisect on the largest fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(model, replace(layout, micro_batch_size=mid), gpu_memory_bytes, **estimate_kw):
            lo = mid
        else:
            hi = mid - 1
    return lo


def longest_sequence(model: ModelShape, layout: ParallelLayout, gpu_memory_bytes: float,
                     multiple: int = 1024, limit: int = 1 << 20, **estimate_kw) -> int:
    """Longest sequence (a multiple of `multiple`, <= limit) whose estimate fits; 0 if none.
    A learned position table of fixed size also caps it."""
    if model.learned_positions and model.max_position_embeddings:
        limit = min(limit, model.max_position_embeddings)
    lo, hi = 0, int(limit) // int(multiple)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(model.with_seq_length(mid * multiple), layout, gpu_memory_bytes,
                 **estimate_kw):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


def relative_cost(model: ModelShape, layout: ParallelLayout) -> float:
    """Predicted time per sample relative to an ideal, penalty-free run (1.0).

    FLOPs from the cost model (`ModelShape.forward_flops_per_token`): training = forward +
    backward (2x forward) = 3 forward units. Causal flash attention skips the masked blocks,
    as the model FLOPs count, but local attention computes the full s x s square: twice the
    attention FLOPs. Full recompute adds one forward of the layers (~33%), selective one
    forward of the core attention (a few % for short sequences, much more for long ones).
    Pipeline bubble: (pp - 1) / m of the step (1F1B, Narayanan et al. 2021); TP/CP
    communication: fixed penalty per doubling.
    """
    flops = model.forward_flops_per_token(layout.tp)
    layers, head = float(flops["layers"]), float(flops["logits"])
    attn = flops["attention"] * (2.0 if layout.attention == "local" else 1.0)
    base = 3.0 * (layers + head + attn)
    extra = {"full": layers + attn, "selective": attn}.get(layout.recompute_granularity, 0.0)
    cost = (base + extra) / base
    cost *= 1.0 + (layout.pp - 1) / layout.num_microbatches
    cost *= 1.0 + TP_COMM_PER_DOUBLING * math.log2(layout.tp)
    cost *= 1.0 + CP_COMM_PER_DOUBLING * math.log2(layout.cp)
    if layout.distributed_optimizer and layout.dp * layout.cp > 1:
        cost *= 1.0 + DIST_OPT_PENALTY
    return cost


def _pow2_divisors(n: int, cap: int) -> List[int]:
    out, d = [], 1
    while d <= min(n, cap):
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


def candidate_layouts(model: ModelShape, world_size: int, global_batch_size: int,
                      attention: str = "flash", recompute_method: str = "uniform",
                      recompute_num_layers: int = 1) -> List[ParallelLayout]:
    """Megatron-valid layouts for `world_size` GPUs and a global batch (powers of two), with
    the given attention kind and full-recompute method / layers."""
    out = []
    for tp in _pow2_divisors(world_size, 8):  # TP stays inside one 8-GPU node
        if model.num_attention_heads % tp or model.num_query_groups % tp:
            continue
        for pp in [d for d in range(1, world_size // tp + 1) if (world_size // tp) % d == 0]:
            if model.num_layers % pp:
                continue
            cps = _pow2_divisors(world_size // (tp * pp), 64) if attention == "flash" else [1]
            for cp in cps:
                if model.seq_length % (2 * cp * tp) and cp > 1:
                    continue
                dp = world_size // (tp * pp * cp)
                if global_batch_size % dp:
                    continue
                per_dp = global_batch_size // dp
                for mbs in _pow2_divisors(per_dp, per_dp):
                    m = per_dp // mbs
                    if pp > 1 and m < pp:
                        continue  # 1F1B needs at least pp micro-batches to fill the pipe
                    for gran in (None, "selective", "full"):
                        out.append(ParallelLayout(
                            tp=tp, pp=pp, dp=dp, cp=cp, sequence_parallel=tp > 1,
                            micro_batch_size=mbs, num_microbatches=m,
                            recompute_granularity=gran, distributed_optimizer=dp * cp > 1,
                            recompute_method=recompute_method,
                            recompute_num_layers=recompute_num_layers, attention=attention))
    return out


def best_config(model: ModelShape, world_size: int, gpu_memory_bytes: float,
                global_batch_size: int, candidates: Optional[Iterable[ParallelLayout]] = None,
                requested: Optional[ParallelLayout] = None,
                **estimate_kw) -> List[Tuple[ParallelLayout, MemoryEstimate, float]]:
    """Layouts that fit, as (layout, estimate, relative cost), fastest first.

    `candidates` defaults to `candidate_layouts(...)` with the attention kind and the
    full-recompute method / layers of `requested` (flash, uniform, 1 without one), so the
    ranking prices what was asked for; `requested` itself is always a candidate. Ties are
    broken by lower memory.
    """
    if candidates is None:
        r = requested or ParallelLayout()
        candidates = candidate_layouts(model, world_size, global_batch_size, r.attention,
                                       r.recompute_method, r.recompute_num_layers)
    candidates = list(candidates)
    if requested is not None and requested not in candidates:
        candidates.append(requested)
    ranked = []
    for layout in candidates:
        est = estimate_memory(model, layout, **estimate_kw)
        if est.total <= gpu_memory_bytes:
            ranked.append((layout, est, relative_cost(model, layout)))
    ranked.sort(key=lambda r: (round(r[2], 9), r[1].total))
    return ranked
