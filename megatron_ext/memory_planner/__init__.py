"""Peak-GPU-memory planner for megatron-core GPT training (pure Python, no torch).

Main API: `ModelShape`, `ParallelLayout`, `estimate_memory(model, layout) -> MemoryEstimate`,
`max_micro_batch_size`, `longest_sequence`, `best_config`, `MemoryPlannerConfig`,
`add_memory_planner_args`, `plan_report` (the text both the CLI and `--plan-memory` print)
and `main` (CLI: `python -m megatron_ext.memory_planner`).
Activation model: Korthikanti et al. 2022; see `estimate.py` for every term. `ModelShape`
(parameters, FLOPs) lives in `megatron_ext.cost_model` and is re-exported here.
"""
from .cli import main
from .config import MemoryPlannerConfig, add_memory_planner_args
from .estimate import GIB, MemoryEstimate, estimate_memory
from .report import plan_report
from .search import (best_config, candidate_layouts, longest_sequence, max_micro_batch_size,
                     relative_cost)
from .shapes import ModelShape, ParallelLayout

__all__ = ["GIB", "MemoryEstimate", "MemoryPlannerConfig", "ModelShape", "ParallelLayout",
           "add_memory_planner_args", "best_config", "candidate_layouts", "estimate_memory",
           "longest_sequence", "main", "max_micro_batch_size", "plan_report", "relative_cost"]
