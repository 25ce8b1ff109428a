"""CPU backend for megatron-core: run the real Megatron code paths on CPU with gloo.

Main API: :func:`enable_cpu_backend` (idempotent; a no-op when CUDA is available).

megatron-core has no CPU path: it allocates on ``torch.cuda.current_device()``, forks the
CUDA RNG for tensor-parallel dropout and recompute, and writes ``device="cuda"`` literals in
a few places. For CI (2 cores, no GPU) we still want to exercise the *real* TP/SP/PP/DP,
DDP, optimizer and recompute code, so instead of forking Megatron files this module swaps
the ``torch`` name inside a short, explicit list of megatron-core modules for a proxy
(:class:`_TorchOnCPU`) that forwards everything to ``torch`` except:

* factory functions (``torch.empty/zeros/ones/full/tensor/arange/...``): a CUDA ``device=``
  argument becomes ``cpu`` and ``pin_memory`` is dropped;
* ``torch.cuda``: a namespace (:class:`_CudaOnCPU`) whose ``current_device()`` returns
  ``"cpu"``, whose RNG functions act on the CPU generator, whose streams/events are no-ops
  and whose ``synchronize()`` does nothing.

Patched modules (megatron-core 0.16.1) and why:

=========================================  ====================================================
module                                      why it needs the proxy
=========================================  ====================================================
core.utils                                  GlobalMemoryBuffer allocates on current_device()
core.tensor_parallel.mappings               SP all-gather / reduce-scatter output buffers
core.tensor_parallel.layers                 linear-with-grad-accumulation gather buffers
core.tensor_parallel.utils                  split/gather 1-D chunk buffers
core.tensor_parallel.random                 RNG tracker + recompute save/restore CUDA RNG
core.distributed.param_and_grad_buffer      DDP grad/param buffers on current_device()
core.distributed.distributed_data_parallel  communication stream (CUDA Stream)
core.pipeline_parallel.schedules            ``total_num_tokens`` created with device="cuda"
core.pipeline_parallel.p2p_communication    PP send/recv shape and activation buffers
core.optimizer.clip_grads                   grad-norm reduction buffers with device="cuda"
core.optimizer.optimizer                    ``found_inf`` / grad-norm tensors on cuda
core.optimizer.distrib_optimizer            state shards allocated on current_device()
core.dist_checkpointing.strategies.*        synchronize() and failure/alive flags on cuda
  (filesystem_async, state_dict_saver, async_utils)
core.transformer.transformer_block          ``torch.cuda`` streams/RNG during recompute
core.transformer.dot_product_attention      causal mask buffer on current_device()
core.models.gpt.gpt_model                   logits/labels helper buffers
core.models.common.embeddings.rotary_pos_embedding  inv_freq on current_device()
core.models.common.embeddings.rope_utils   CP slice index created with pin_memory=True
core.rerun_state_machine                    NaN/Inf report names torch.cuda.current_device()
core.timers                                 Timer.start/stop call torch.cuda.synchronize()
core.transformer.utils                      causal mask created with device="cuda"
=========================================  ====================================================

In addition the tensor-parallel RNG helpers ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``
are replaced by CPU-generator versions: on CPU there is one generator, so Megatron's
"CUDA" RNG and its tracker states are all states of ``torch.default_generator``; forking it
for tensor-parallel regions and restoring it for recompute keeps Megatron's semantics.

``torch.Tensor.cuda`` becomes the identity (only when CUDA is absent, where it could only
raise): ``LanguageModule`` calls ``weight.data.cuda()`` to sync tied embeddings under PP.

``clip_grad_by_total_norm_fp32`` (in ``core.optimizer.clip_grads`` and the name imported by
``core.optimizer.optimizer``) is replaced by an equivalent that does not assert
``grad.type() == 'torch.cuda.FloatTensor'``.

``DistributedOptimizer._build_model_and_main_param_groups`` sorts parameters by
``param.type()`` (``'torch.cuda.FloatTensor'`` etc.) and rejects anything else: while it
runs, CPU tensors report their type under the CUDA name (:func:`_cuda_type_names`), so the
distributed optimizer (``--use-distributed-optimizer``, ``--dp-reduction hierarchical``)
shards fp32 CPU parameters exactly as it shards CUDA ones.

The module refuses any other megatron-core version (:data:`SUPPORTED_MEGATRON_CORE`),
because every patch above names a specific code path of that version.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE = ("0.16.1",)

PATCHED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.timers",
)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_strided", "as_tensor", "linspace", "empty_like", "zeros_like",
)

_enabled = False


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a CUDA ordinal, e.g. torch.cuda.current_device()
        return True
    return torch.device(device).type == "cuda"


def _cpu_factory(fn):
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: CPU work is already in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CudaOnCPU(types.SimpleNamespace):
    """``torch.cuda`` as seen by the patched megatron-core modules on a CPU-only machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    Stream = _NoOpStream
    Event = _NoOpStream

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NoOpStream()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NoOpStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def nvtx_range_push(*args, **kwargs):
        pass

    @staticmethod
    def nvtx_range_pop(*args, **kwargs):
        pass

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def max_memory_allocated(*args, **kwargs):
        return 0


class _TorchOnCPU(types.ModuleType):
    """A stand-in for the ``torch`` module inside patched megatron-core modules."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCPU()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # Megatron's version asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _tensor_cuda_on_cpu(self, *args, **kwargs):
    return self


def _cuda_type_names(method):
    """``method`` (a classmethod's function) run while ``Tensor.type()`` names CPU tensors
    ``torch.cuda.*Tensor``: the distributed optimizer's dtype dispatch compares those strings."""
    def wrapper(cls, *args, **kwargs):
        original = torch.Tensor.type

        def cuda_named_type(self, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw and self.device.type == "cpu":
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, non_blocking, **kw)

        torch.Tensor.type = cuda_named_type
        try:
            return method(cls, *args, **kwargs)
        finally:
            torch.Tensor.type = original

    wrapper.__name__ = method.__name__
    return classmethod(wrapper)


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def enable_cpu_backend(force: bool = False) -> bool:
    """Patch megatron-core so that it runs on CPU tensors. Returns True if the backend is on.

    A no-op (returns False) when CUDA is available, unless ``force`` is set (tests use it to
    run the CPU path on GPU machines too).
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available() and not force:
        return False
    version = megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_ext's CPU backend is written against megatron-core "
            f"{', '.join(SUPPORTED_MEGATRON_CORE)} but {version} is installed: "
            f"`pip install megatron-core==0.16.1`, or run on a GPU."
        )
    proxy = _TorchOnCPU()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"CPU backend: {name} does not import torch as expected")
        module.torch = proxy
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _cpu_get_rng_state
    random_mod._set_cuda_rng_state = _cpu_set_rng_state
    # LanguageModule moves the tied embedding copy with ``weight.data.cuda()`` (PP > 1); on a
    # machine without CUDA that call can only fail, so it becomes the identity.
    torch.Tensor.cuda = _tensor_cuda_on_cpu
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    dist_opt = importlib.import_module(
        "megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    dist_opt._build_model_and_main_param_groups = _cuda_type_names(
        dist_opt._build_model_and_main_param_groups.__func__)
    _enabled = True
    logger.info("megatron_ext CPU backend enabled for megatron-core %s", version)
    return True


def is_enabled() -> bool:
    return _enabled
