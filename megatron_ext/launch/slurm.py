"""Start ``torchrun`` on every node of a SLURM job step, from SLURM's environment.

Main API: :func:`main`, the CLI, run by ``srun --ntasks-per-node=1`` (one launcher per node);
the arguments come from ``slurm_env.py``::

    srun --ntasks-per-node=1 python -m megatron_ext.launch.slurm -- examples/pretrain_gpt.py ...
    python -m megatron_ext.launch.slurm --dry-run -- examples/pretrain_gpt.py ...  # print only

It prints the torchrun command, then becomes torchrun (``exec``, so that srun and SLURM's
signals reach torchrun itself). Nodes meet through torchrun's c10d rendezvous on the first
host of the step's node list (``--rendezvous static`` gives ``--node-rank SLURM_NODEID``
instead). Other torchrun settings go through its ``PET_*`` variables (``PET_MAX_RESTARTS=3``).

Signals: SIGUSR1 (``sbatch --signal=USR1@120``) asks the training processes to save and stop;
torchrun's agent does not handle it, and its default action would kill the agent and orphan
the workers. So the launcher sets SIGUSR1 to "ignore" before the exec: torchrun inherits that
and so do its workers, until the training code installs its own handler. SLURM signals every
process of the step (ProctrackType=proctrack/cgroup, the usual setting), so the workers get it
directly. SIGTERM/SIGINT are torchrun's: it passes them on to the workers.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Mapping, Optional, Sequence

from megatron_ext.launch.slurm_env import SlurmEnvError, slurm_node, torchrun_command

PROG = "python -m megatron_ext.launch.slurm"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, usage=f"{PROG} [options] -- SCRIPT [ARGS...]",
                                description="Run SCRIPT under torchrun on every node of a "
                                            "SLURM job step (start one launcher per node).")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--port", type=int, default=None,
                   help="rendezvous port on the first node (default: from SLURM_JOB_ID)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per node (default: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES)")
    p.add_argument("--rendezvous", choices=("c10d", "static"), default="c10d",
                   help="c10d: nodes join in any order (default); static: node rank = "
                        "SLURM_NODEID, MASTER_ADDR = first node")
    return p


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None,
         execv=os.execv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("put the training command after `--`, e.g. "
                     f"{PROG} -- examples/pretrain_gpt.py --flags...")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    try:
        node = slurm_node(env, args.nproc_per_node)
    except SlurmEnvError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cmd = torchrun_command(node, argv[cut + 1:], args.port, args.rendezvous)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec: see the docstring
    execv(cmd[0], cmd)
    return 0  # only reached when execv is replaced (tests)


if __name__ == "__main__":
    sys.exit(main())
