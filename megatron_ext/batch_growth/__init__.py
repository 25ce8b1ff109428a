"""Dynamic global-batch growth from the measured gradient noise scale (pure Python).

Main API:
  BatchGrowthConfig, add_batch_growth_args        -- flags and validation (config.py)
  Topology, parse_topology, detect                -- cluster description (topology.py)
  BatchPlanner, Plan, gpt_flops_per_sample        -- micro-batch split + step time (planner.py)
  BatchController                                 -- grows the batch: ramp/gns/goodput
  lr_scale_factor, LRScaler, TokenLRSchedule      -- LR vs batch and tokens (lr_scaling.py)

No torch and no Megatron imports: the training loop feeds the controller B_simple and step
times and applies the batch it returns.
"""
from .config import BatchGrowthConfig, add_batch_growth_args
from .controller import BatchController, Decision, pollux_efficiency
from .lr_scaling import LRScaler, TokenLRSchedule, adascale_gain, lr_scale_factor
from .planner import BatchPlanner, Plan, gpt_flops_per_sample, gpt_param_count
from .topology import GPU_PRESETS, Topology, detect, parse_topology

__all__ = [
    "BatchGrowthConfig", "add_batch_growth_args", "BatchController", "Decision",
    "pollux_efficiency", "LRScaler", "TokenLRSchedule", "adascale_gain", "lr_scale_factor",
    "BatchPlanner", "Plan", "gpt_flops_per_sample", "gpt_param_count", "GPU_PRESETS",
    "Topology", "detect", "parse_topology",
]
