"""SLURM's environment -> where this node stands in the job step -> torchrun's arguments.

Main API: :func:`slurm_node` (environment -> :class:`SlurmNode`, or :class:`SlurmEnvError`
with a one-line reason), :func:`torchrun_args`, :func:`torchrun_command`, :func:`default_port`.
The CLI around them is ``megatron_ext/launch/slurm.py``.

Variables read (step-level ones first, as srun sets them): SLURM_JOB_ID, SLURM_STEP_ID (set by
srun, absent in the batch shell), SLURM_STEP_NODELIST / SLURM_JOB_NODELIST,
SLURM_STEP_NUM_NODES / SLURM_NNODES, SLURM_STEP_NUM_TASKS / SLURM_NTASKS, SLURM_NODEID,
SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES / SLURM_NTASKS_PER_NODE, SLURM_RESTART_COUNT.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from megatron_ext.launch.hostlist import HostlistError, expand_hostlist


class SlurmEnvError(ValueError):
    """Not inside a SLURM job step, or an environment the launcher cannot use."""


@dataclass(frozen=True)
class SlurmNode:
    """This node's part of the job step."""

    job_id: str
    restart_count: int
    hosts: Tuple[str, ...]
    """Every node of the step, in SLURM's order; hosts[0] hosts the rendezvous."""
    node_rank: int
    nproc_per_node: int
    nproc_source: str
    """Where nproc_per_node came from (an environment variable or the flag)."""

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def rdzv_id(self) -> str:
        # A requeued job keeps its id: the restart count tells its runs apart in torchrun's
        # rendezvous and logs.
        return f"{self.job_id}-{self.restart_count}"


def _first(env: Mapping[str, str], *names: str) -> Tuple[Optional[str], Optional[str]]:
    """(name, value) of the first variable that is set and not empty."""
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None, None


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{name}={value!r} is not a whole number") from None


def _hosts(env: Mapping[str, str], in_step: bool) -> Tuple[str, ...]:
    names = ("SLURM_STEP_NODELIST",) if in_step else ()
    name, value = _first(env, *names, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if name is None:
        raise SlurmEnvError("SLURM_JOB_NODELIST is unset: cannot tell which nodes run the job")
    try:
        hosts = expand_hostlist(value)
    except HostlistError as e:
        raise SlurmEnvError(f"{name}: {e}") from None
    if len(set(hosts)) != len(hosts):
        raise SlurmEnvError(f"{name}={value!r} names a host twice")
    nn_name, nn = _first(env, *(("SLURM_STEP_NUM_NODES",) if in_step else ()), "SLURM_NNODES",
                         "SLURM_JOB_NUM_NODES")
    if nn is not None and _int(nn_name, nn) != len(hosts):
        raise SlurmEnvError(f"{nn_name}={nn} but {name}={value!r} names {len(hosts)} host(s)")
    return tuple(hosts)


def _check_one_task_per_node(env: Mapping[str, str], in_step: bool, nnodes: int) -> None:
    """Every launcher starts a torchrun agent for the whole node, so exactly one per node."""
    if not in_step:
        if nnodes > 1:
            raise SlurmEnvError(f"this is the batch shell of a {nnodes}-node job: start the "
                                "launcher with `srun --ntasks-per-node=1` so every node runs it")
        return
    name, ntasks = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if ntasks is not None and _int(name, ntasks) != nnodes:
        raise SlurmEnvError(f"srun started {ntasks} launchers on {nnodes} node(s): run one per "
                            "node (`srun --ntasks-per-node=1`); torchrun starts the GPU processes")


def _nproc(env: Mapping[str, str], in_step: bool, given: Optional[int]) -> Tuple[int, str]:
    if given is not None:
        if given < 1:
            raise SlurmEnvError(f"--nproc-per-node must be >= 1, got {given}")
        return given, "--nproc-per-node"
    gpus = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus and _int("SLURM_GPUS_ON_NODE", gpus) > 0:
        return int(gpus), "SLURM_GPUS_ON_NODE"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "NoDevFiles":  # SLURM writes NoDevFiles on GPU-less nodes
        return len([d for d in visible.split(",") if d.strip()]), "CUDA_VISIBLE_DEVICES"
    tasks = env.get("SLURM_NTASKS_PER_NODE", "").strip()
    # Inside a step that variable describes the step (one launcher per node), not the GPUs.
    if tasks and not in_step and _int("SLURM_NTASKS_PER_NODE", tasks) > 0:
        return int(tasks), "SLURM_NTASKS_PER_NODE"
    raise SlurmEnvError("cannot tell how many processes to start per node: ask SLURM for GPUs "
                        "(--gpus-per-node) or pass --nproc-per-node N")


def slurm_node(env: Optional[Mapping[str, str]] = None,
               nproc_per_node: Optional[int] = None) -> SlurmNode:
    """This node's view of the job step; SlurmEnvError (one line) when it does not add up."""
    env = os.environ if env is None else env
    _, job_id = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job_id is None:
        raise SlurmEnvError("not inside a SLURM allocation (SLURM_JOB_ID is unset): submit with "
                            "sbatch/salloc, or call torchrun directly")
    in_step = bool(_first(env, "SLURM_STEP_ID", "SLURM_STEPID")[0])
    hosts = _hosts(env, in_step)
    _check_one_task_per_node(env, in_step, len(hosts))
    name, node_id = _first(env, "SLURM_NODEID")
    if name is None and len(hosts) > 1:
        raise SlurmEnvError(f"SLURM_NODEID is unset in a {len(hosts)}-node step")
    node_rank = _int(name, node_id) if name else 0
    if not 0 <= node_rank < len(hosts):
        raise SlurmEnvError(f"SLURM_NODEID={node_id} is outside the step's {len(hosts)} node(s)")
    nproc, source = _nproc(env, in_step, nproc_per_node)
    restarts = _int("SLURM_RESTART_COUNT", env.get("SLURM_RESTART_COUNT", "").strip() or "0")
    return SlurmNode(job_id, restarts, hosts, node_rank, nproc, source)


def default_port(job_id: str) -> int:
    """A rendezvous port that differs between jobs sharing a node; it stays in 20000-29999,
    below Linux's ephemeral range (32768+), where outgoing connections take their ports."""
    return 20000 + int(job_id) % 10000 if job_id.isdigit() else 29500


def torchrun_args(node: SlurmNode, port: int, rendezvous: str = "c10d") -> List[str]:
    """The torchrun options (not the script) that place this node in the job."""
    args = ["--nnodes", str(node.nnodes), "--nproc-per-node", str(node.nproc_per_node)]
    if rendezvous == "c10d":
        # Node 0 (the first host) says that it hosts the rendezvous store instead of letting
        # torchrun guess from host names, which fails where SLURM's node names differ from them.
        return args + ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{node.hosts[0]}:{port}",
                       "--rdzv-id", node.rdzv_id,
                       "--rdzv-conf", f"is_host={int(node.node_rank == 0)}"]
    if rendezvous == "static":
        return args + ["--node-rank", str(node.node_rank), "--master-addr", node.hosts[0],
                       "--master-port", str(port)]
    raise ValueError(f"rendezvous must be c10d or static, got {rendezvous!r}")


def torchrun_command(node: SlurmNode, script: Sequence[str], port: Optional[int] = None,
                     rendezvous: str = "c10d") -> List[str]:
    """argv that runs ``script`` (path and flags) under torchrun with this interpreter."""
    port = default_port(node.job_id) if port is None else port
    return [sys.executable, "-m", "torch.distributed.run",
            *torchrun_args(node, port, rendezvous), *script]


__all__ = ["SlurmEnvError", "SlurmNode", "default_port", "slurm_node", "torchrun_args",
           "torchrun_command"]
