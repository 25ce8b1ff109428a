"""Gradient-noise-scale measurement (McCandlish et al. 2018).

Import-light (no torch): exports the pure-Python estimator and the config. The training
hooks (`GNSTracker`, the GNS layers, `gns_layer_specs`, `GNSGPTModel`) import torch and
megatron-core and are loaded lazily on first attribute access (PEP 562), or import them from
`megatron_ext.gns.tracker` / `.layers` / `.embedding`.
"""
import importlib

from .config import GNS_ESTIMATORS, GNSConfig, add_gns_args
from .estimator import GNSEstimator, GNSMeasurement

_LAZY = {
    "GNSTracker": "tracker",
    "GNSColumnParallelLinear": "layers",
    "GNSRowParallelLinear": "layers",
    "GNSNorm": "layers",
    "gns_layer_specs": "layers",
    "tracked_parameters": "layers",
    "GNSGPTModel": "embedding",
}

__all__ = ["GNS_ESTIMATORS", "GNSConfig", "add_gns_args", "GNSEstimator", "GNSMeasurement",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
