"""Triton kernels of megatron_ext, installed as `megatron_ext.kernels`.

Public API (per-sample gradient norms for gradient-noise-scale measurement):
    wgrad_sample_norms / wgrad_sample_norms_reference / kernel_backend / kernel_is_interpreted
    LinearWithSampleNorms, linear_with_sample_norms, TensorParallelComm, SampleNormAccumulator
    NormWithSampleNorms, norm_param_sample_grads(_reference), norm_param_backend
    wgrad_sample_norms_ghost / _batched / _route (torch dW + ghost norms or a batched product)

Names are loaded lazily (PEP 562), so `import megatron_ext.kernels` neither imports
Triton nor freezes the interpreter choice: Triton reads TRITON_INTERPRET when a kernel
module is first imported. Set TRITON_INTERPRET=1 before that to run the kernels on CPU
tensors in Triton's interpreter; otherwise CPU tensors use the PyTorch references.
"""
import importlib

_EXPORTS = {
    "LinearWithSampleNorms": "linear_sample_norm",
    "SampleNormAccumulator": "linear_sample_norm",
    "TensorParallelComm": "linear_sample_norm",
    "linear_with_sample_norms": "linear_sample_norm",
    "NormWithSampleNorms": "norm_param_sample_norm",
    "norm_param_backend": "norm_param_sample_norm",
    "norm_param_sample_grads": "norm_param_sample_norm",
    "norm_param_sample_grads_reference": "norm_param_sample_norm",
    "WgradSampleNorms": "wgrad_sample_norm_reference",
    "wgrad_sample_norms_reference": "wgrad_sample_norm_reference",
    "kernel_backend": "wgrad_sample_norm",
    "kernel_is_interpreted": "wgrad_sample_norm",
    "wgrad_sample_norms": "wgrad_sample_norm",
    "ROUTE_NAMES": "wgrad_sample_norm_routes",
    "wgrad_sample_norms_batched": "wgrad_sample_norm_routes",
    "wgrad_sample_norms_ghost": "wgrad_sample_norm_routes",
    "wgrad_sample_norms_route": "wgrad_sample_norm_routes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
