"""Dynamic global-batch growth from the measured gradient noise scale (pure Python).

Main API:
  BatchGrowthConfig, add_batch_growth_args        -- flags and validation (config.py)
  Topology, parse_topology, detect                -- cluster description (topology.py)
  BatchPlanner, Plan                              -- micro-batch split + step time (planner.py)
  BatchController, Progress                       -- grows the batch: ramp/gns/goodput
  lr_scale_factor, LRScaler                       -- LR vs batch (lr_scaling.py)
  BatchGrowthComponent (component.py)             -- the training-loop component

No torch and no Megatron imports here: the component feeds the controller the run's progress,
B_simple and step times, and applies the batch it returns to the train state (a `ramp` asks
megatron-core's own ramp-up calculator, imported when it is built). The planner takes a
model's FLOPs per sample and parameter count as numbers; for a GPT they come from
`megatron_ext.cost_model.ModelShape`.
"""
from .config import BatchGrowthConfig, add_batch_growth_args
from .controller import BatchController, Decision, Progress, pollux_efficiency
from .lr_scaling import LRScaler, adascale_gain, lr_scale_factor
from .planner import BatchPlanner, Plan
from .topology import GPU_PRESETS, Topology, detect, parse_topology

__all__ = [
    "BatchGrowthConfig", "add_batch_growth_args", "BatchController", "Decision", "Progress",
    "pollux_efficiency", "LRScaler", "adascale_gain", "lr_scale_factor",
    "BatchPlanner", "Plan", "GPU_PRESETS",
    "Topology", "detect", "parse_topology",
]
