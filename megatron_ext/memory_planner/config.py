"""Configuration of the memory planner.

Main API: `MemoryPlannerConfig`, `add_memory_planner_args(parser)` (argparse group
"memory planner") and `MemoryPlannerConfig.from_args(args)`. Flag `--foo-bar` -> `foo_bar`.
Sizes are in GiB (2^30 bytes): an "80 GB" H100 has 79.6 GiB.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_ext.config_flags import FlagConfig

from .estimate import GIB


@dataclass
class MemoryPlannerConfig(FlagConfig):
    """Peak-memory prediction before training starts."""

    flag_group = "memory planner"

    plan_memory: bool = False
    """Print the predicted peak memory per GPU (and warn if it does not fit) at startup."""

    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (H100/A100 80GB: 79.6 physically; use ~79 to be safe)."""

    memory_overhead_gb: float = 1.0
    """CUDA context, cuBLAS/NCCL workspaces and other memory the allocator does not see."""

    memory_fragmentation: float = 1.05
    """Caching-allocator fragmentation factor applied to weights, grads, optimizer and
    activations (1.0 = none; raise it if real peaks exceed the prediction)."""

    def __post_init__(self):
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be > 0 (GiB per GPU, e.g. 80), "
                             f"got {self.gpu_memory_gb}")
        if not 0 <= self.memory_overhead_gb < self.gpu_memory_gb:
            raise ValueError(f"--memory-overhead-gb must be in [0, --gpu-memory-gb) "
                             f"(typical 0.5-2), got {self.memory_overhead_gb}")
        if not 1.0 <= self.memory_fragmentation <= 2.0:
            raise ValueError(f"--memory-fragmentation is a factor in [1.0, 2.0] (typical "
                             f"1.05-1.2), got {self.memory_fragmentation}")

    @property
    def gpu_memory_bytes(self) -> int:
        return int(self.gpu_memory_gb * GIB)

    def estimate_kwargs(self) -> dict:
        """Keyword arguments for `estimate_memory` and the searches."""
        return {"overhead_bytes": int(self.memory_overhead_gb * GIB),
                "fragmentation": self.memory_fragmentation}


def add_memory_planner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "memory planner" argparse group; flags map 1:1 to :class:`MemoryPlannerConfig` fields."""
    return MemoryPlannerConfig.add_args(parser)
