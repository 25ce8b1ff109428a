"""The feature components of a job, built from its :class:`JobConfig`.

Main API: :func:`build_components` -> ``(gns or None, batch_growth or None)`` and
:func:`build_planner` (the batch planner of the job: its model costs from the one cost
model, its topology, and on a GPU the memory planner's largest micro-batch).
"""
from __future__ import annotations

import torch

from megatron_ext.batch_growth.planner import BatchPlanner
from megatron_ext.batch_growth.topology import detect, parse_topology
from megatron_ext.training.dp_reduction import distributed_optimizer_in_use


def _max_micro_batch(job, shape) -> int:
    """On a GPU, the memory planner's largest micro-batch for this device (never below the
    requested one); on CPU, the requested micro-batch."""
    micro = job.training.micro_batch_size
    if not torch.cuda.is_available():
        return micro
    from megatron_ext.memory_planner import max_micro_batch_size
    from megatron_ext.training.memory_report import parallel_layout

    budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return max(micro, max_micro_batch_size(shape, parallel_layout(job), budget,
                                           **job.memory.estimate_kwargs()))


def job_topology(spec: str):
    """``--topology`` parsed, or with ``auto`` detected on rank 0 and broadcast: nodes can read
    nvidia-smi or the IB links differently, and every rank must plan the same batches and
    the same reduction (else collectives mismatch and the job hangs)."""
    if spec != "auto":
        return parse_topology(spec)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return detect()
    box = [detect() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_planner(job, shape) -> BatchPlanner:
    cfg = job.batch_growth
    topology = job_topology(cfg.topology)
    return BatchPlanner(
        shape.flops_per_sample(job.tp), shape.num_params(job.tp), topology,
        dp_size=job.data_parallel_size, tp_size=job.tp, pp_size=job.pp,
        max_micro_batch_size=_max_micro_batch(job, shape), seq_length=job.model.seq_length,
        mfu_assumed=cfg.mfu_assumed, device_model=torch.cuda.is_available(),
        distributed_optimizer=distributed_optimizer_in_use(job))


def build_components(job, shape, log):
    """``(GNSComponent or None, BatchGrowthComponent or None)`` for ``job``."""
    gns = growth = None
    if job.gns.gns:
        from megatron_ext.gns.component import GNSComponent

        gns = GNSComponent(job.gns, log)
    if job.batch_growth.batch_growth != "off":
        from megatron_ext.batch_growth.component import BatchGrowthComponent

        growth = BatchGrowthComponent(
            job.batch_growth, job.training.global_batch_size, build_planner(job, shape),
            b_simple=(lambda: gns.b_simple) if gns else (lambda: None), log=log)
    return gns, growth


__all__ = ["build_components", "build_planner", "job_topology"]
