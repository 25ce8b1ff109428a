"""How the data-parallel gradients are reduced: ``--dp-reduction {auto,flat,hierarchical}``.

Main API: :func:`ranks_per_node`, :func:`node_layout_problem` (a flag/machine mismatch as one
line, or None), :func:`choose` -> :class:`DPReduction` (the decision, made once at start).

``flat``: megatron-core's DDP all-reduces the gradient buffer over the whole data-parallel
group (or, with ``--use-distributed-optimizer``, reduce-scatters it over the whole group).
``hierarchical``: megatron-core's distributed optimizer with one *instance* per node
(``num_distributed_optimizer_instances`` in ``parallel_state.initialize_model_parallel`` and
``DistributedDataParallelConfig``): the gradients are reduce-scattered inside a node (NVLink),
each shard is all-reduced across the nodes (InfiniBand; every instance holds the same shard
layout), the optimizer updates its shard, and the parameters are all-gathered inside the
node again. Across nodes only 1/g of the gradient travels (g: data-parallel ranks per node).

``auto`` asks the batch planner (its topology model, ``batch_growth.planner``) which of the two
it predicts faster for one gradient reduction (the gradient's size sets it, not the batch),
once at start; the startup log prints both predicted times. On one
node there is nothing to gain: auto is flat.

A node is what torchrun calls one (``LOCAL_WORLD_SIZE`` processes): two torchrun agents on one
machine (``--nnodes 2``) are two nodes, which is how the CPU tests simulate a cluster.
megatron-core lays ranks out TP-fastest (order tp-cp-ep-dp-pp), so a node of g consecutive
ranks holds g / (TP x CP) ranks of every data-parallel group when TP x CP divides g.
Imports no torch or Megatron (the planner is imported only for ``auto`` on several nodes).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Mapping, Optional


@dataclass
class DPReduction:
    """The reduction a run uses (decided once, at start)."""

    kind: str
    """``flat`` or ``hierarchical``."""
    instances: int
    """Distributed-optimizer instances (1 unless hierarchical over several nodes)."""
    distributed_optimizer: bool
    """Whether megatron-core's distributed optimizer runs."""
    note: str
    """One line for the startup log: what was chosen and why."""


def ranks_per_node(env: Optional[Mapping[str, str]] = None, world_size: int = 1) -> int:
    """Processes per node: torchrun's ``LOCAL_WORLD_SIZE`` (the whole world without torchrun)."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE") or world_size)


def _nodes_of_dp_group(job, per_node: int) -> int:
    """Nodes one data-parallel (x CP) group spans; raises ValueError if nodes split it unevenly."""
    inner = job.tp * job.cp
    span = inner * job.data_parallel_size  # consecutive ranks of one pipeline stage
    if per_node % inner or (span > per_node and span % per_node) or \
            (span < per_node and per_node % span):
        raise ValueError(
            f"--dp-reduction hierarchical needs nodes that hold whole TP x CP groups and split "
            f"the data-parallel groups evenly: {per_node} processes per node (LOCAL_WORLD_SIZE) "
            f"with TP {job.tp} x CP {job.cp} x DP {job.data_parallel_size}; change the layout "
            f"or use --dp-reduction flat")
    return max(1, span // per_node)


def node_layout_problem(job, per_node: int) -> Optional[str]:
    """Why this machine layout cannot run ``job``'s --dp-reduction, or None."""
    if job.parallel.dp_reduction != "hierarchical":
        return None
    try:
        nodes = _nodes_of_dp_group(job, per_node)
    except ValueError as e:
        return str(e)
    if nodes > 1 and not _have_einops():
        return ("--dp-reduction hierarchical: megatron-core builds the groups of several "
                "optimizer instances with einops: pip install einops")
    return None


def _have_einops() -> bool:
    import importlib.util

    return importlib.util.find_spec("einops") is not None


def predicted_reduction_times(job, per_node: int) -> Dict[str, float]:
    """Adapter to the batch planner: predicted seconds of one gradient reduction per
    algorithm (``{"flat": s, "hierarchical": s}``; only ``flat`` on one node) with this run's
    model, layout and topology. The gradient's size sets it, not the global batch, so it is
    the same at every batch the run may reach."""
    from megatron_ext.data import build_tokenizer
    from megatron_ext.training.components import build_planner

    planner = build_planner(job, job.model_shape(build_tokenizer(job.data).vocab_size))
    return planner.reduction_times()


def optimizer_instances() -> int:
    """Distributed-optimizer instances megatron-core was initialised with (1 before then)."""
    ps = sys.modules.get("megatron.core.parallel_state")  # (never imported from here)
    if ps is None or not ps.model_parallel_is_initialized():
        return 1
    full = ps.get_data_parallel_world_size(with_context_parallel=True)
    return full // ps.get_data_parallel_world_size(with_context_parallel=True,
                                                   partial_data_parallel=True)


def distributed_optimizer_in_use(job) -> bool:
    """Whether the run's optimizer is megatron-core's distributed one: asked for, or implied by
    a hierarchical reduction (its instances are the hierarchy), including one ``auto`` chose.
    The one answer for the model, the optimizer, the batch planner and the memory report."""
    p = job.parallel
    return p.use_distributed_optimizer or p.dp_reduction == "hierarchical" \
        or optimizer_instances() > 1


def choose(job, per_node: int, predict=predicted_reduction_times) -> DPReduction:
    """The reduction of ``job`` on nodes of ``per_node`` processes (``predict``: injectable
    for tests, ``(job, per_node) -> {algorithm: seconds}``)."""
    p = job.parallel
    requested = p.dp_reduction
    nodes = _nodes_of_dp_group(job, per_node) if requested == "hierarchical" else None
    if requested == "auto":
        if job.data_parallel_size * job.cp < 2 or job.world_size <= per_node:
            return DPReduction("flat", 1, p.use_distributed_optimizer,
                               "dp reduction: flat (auto: one node or no data parallelism)")
        try:
            nodes = _nodes_of_dp_group(job, per_node)
        except ValueError:
            return DPReduction("flat", 1, p.use_distributed_optimizer,
                               "dp reduction: flat (auto: nodes split the data-parallel groups "
                               "unevenly, hierarchical cannot run)")
        try:
            times = predict(job, per_node)
        except ValueError as e:  # e.g. a --topology smaller than this job
            return DPReduction("flat", 1, p.use_distributed_optimizer,
                               f"dp reduction: flat (auto: no prediction: {e})")
        shown = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(times.items()))
        faster = times.get("hierarchical", float("inf")) < times.get("flat", float("inf"))
        requested = "hierarchical" if faster and nodes > 1 and _have_einops() else "flat"
        why = f"auto: planner predicts per gradient reduction {shown}" + (
            "; einops is not installed" if faster and not _have_einops() else "")
    else:
        why = "--dp-reduction " + requested
    if requested == "flat":
        return DPReduction("flat", 1, p.use_distributed_optimizer, f"dp reduction: flat ({why})")
    return DPReduction(
        "hierarchical", nodes, True,
        f"dp reduction: hierarchical ({why}): distributed optimizer, {nodes} instance(s) of "
        f"{job.data_parallel_size * job.cp // nodes} data-parallel ranks (one per node): "
        f"reduce-scatter inside a node, all-reduce of the shard across nodes")


__all__ = ["DPReduction", "choose", "node_layout_problem", "predicted_reduction_times",
           "ranks_per_node"]
