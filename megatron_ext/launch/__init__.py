"""Launching training on clusters.

Main API:
  expand_hostlist                 -- SLURM host lists such as ``gpu[01-03,07]`` (hostlist.py)
  slurm_node, torchrun_command    -- SLURM environment -> torchrun arguments (slurm_env.py)

CLI: ``srun --ntasks-per-node=1 python -m megatron_ext.launch.slurm -- examples/pretrain_gpt.py
...``; the job script ``examples/slurm/pretrain_gpt.sbatch`` shows the whole cycle (signals,
auto-resume, requeue). Pure Python: nothing imports torch before torchrun starts.
"""
from .hostlist import HostlistError, expand_hostlist
from .slurm_env import (SlurmEnvError, SlurmNode, default_port, slurm_node, torchrun_args,
                    torchrun_command)

__all__ = ["HostlistError", "expand_hostlist", "SlurmEnvError", "SlurmNode", "default_port",
           "slurm_node", "torchrun_args", "torchrun_command"]
