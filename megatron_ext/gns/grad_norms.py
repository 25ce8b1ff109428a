"""Squared norm of the (reduced or per-rank) gradient over the GNS-tracked parameters.

Main API:
    local_grad_sq_norm(params, tp_group, reduce_sp, shards, device) -> 0-dim fp64 tensor
    distributed_optimizer_shards(model_chunks) -> {param: (lo, hi)} or None

Rules (the same the layers use for per-sample norms, so |G_B|^2 and |g_i|^2 cover the
same parameter set): TP-sharded params (`tensor_model_parallel`) add over the TP group;
params duplicated on every TP rank are counted on TP rank 0 only; sequence-parallel params
before finalize hold TP-partial grads and are summed over TP first. The caller sums the
result over the model-parallel group (TP x PP), and over DP when a distributed optimizer
left each DP rank with a shard of the reduced grads.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def _grad(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    g = getattr(p, "main_grad", None)  # Megatron DDP's fp32 buffer view
    return g if g is not None else p.grad


def local_grad_sq_norm(params: Sequence[torch.nn.Parameter], tp_group, reduce_sp: bool,
                       shards: Optional[Dict], device) -> torch.Tensor:
    """This rank's share of Σ_params ‖grad‖² (stays on `device`: no host sync).

    reduce_sp: grads of sequence-parallel params are TP-partial (before finalize):
        all-reduce copies of them over TP before squaring.
    shards: from `distributed_optimizer_shards` after finalize, else None.
    """
    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    counted, sp = [], []
    for p in params:
        g = _grad(p)
        if g is None:
            continue
        if shards is not None and p in shards:  # after a reduce-scatter: own slice only
            lo, hi = shards[p]
            g = g.reshape(-1)[lo:hi]
        if getattr(p, "tensor_model_parallel", False):
            counted.append(g.detach())
        elif reduce_sp and tp_size > 1 and getattr(p, "sequence_parallel", False):
            sp.append(g.detach().float().reshape(-1))
        elif tp_rank == 0:
            counted.append(g.detach())
    if sp:
        flat = torch.cat(sp)
        dist.all_reduce(flat, group=tp_group)
        if tp_rank == 0:
            counted.append(flat)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if counted:  # one fused multi-tensor norm instead of a kernel (and sync) per param
        norms = torch._foreach_norm([g if g.dtype == torch.float32 else g.float() for g in counted])
        total += torch.stack(norms).double().square().sum()
    return total


def distributed_optimizer_shards(model_chunks) -> Optional[Dict[torch.nn.Parameter, Tuple[int, int]]]:
    """param -> (lo, hi): the slice of its flat main_grad this DP rank holds reduced.

    With Megatron's distributed optimizer, finalize reduce-scatters each bucket, so the
    reduced grad of a param is spread over DP ranks; |G_B|^2 is then the sum over DP ranks
    of their shards. None when no chunk uses the distributed optimizer.
    """
    ranges = None
    for c in model_chunks:
        if not getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False):
            continue
        ranges = {} if ranges is None else ranges
        where = {}  # bucket -> (number of shards, this rank's shard)
        for group in list(c.bucket_groups) + list(c.expert_parallel_bucket_groups):
            for bucket in group.buckets:
                where[id(bucket)] = (group.intra_distributed_optimizer_instance_size,
                                     group.intra_distributed_optimizer_instance_rank)
        for buffer in list(c.buffers) + list(c.expert_parallel_buffers):
            for p, (start, end, bucket_id) in buffer.param_index_map.items():
                bucket = buffer.buckets[bucket_id]
                n, r = where[id(bucket)]
                shard = bucket.grad_data.numel() // n
                start, end = start - bucket.offset, end - bucket.offset  # within the bucket
                lo, hi = max(start, r * shard), min(end, (r + 1) * shard)
                ranges[p] = (lo - start, max(lo, hi) - start)
    return ranges
