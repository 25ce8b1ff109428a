"""The CPU backend patches exactly its documented list and refuses other megatron versions."""

import importlib
import subprocess
import sys

import pytest
import torch

from megatron_ext import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_patches_listed_modules_and_is_idempotent():
    assert cpu_backend.enable_cpu_backend()
    assert cpu_backend.enable_cpu_backend()  # second call is a no-op
    for name in cpu_backend.PATCHED_MODULES:
        assert isinstance(importlib.import_module(name).torch, cpu_backend._TorchOnCPU), name
        assert name.replace("megatron.", "").split(".")[-1] in cpu_backend.__doc__, name


def test_proxy_redirects_cuda_allocations_to_cpu():
    proxy = cpu_backend._TorchOnCPU()
    t = proxy.empty(3, device=proxy.cuda.current_device())
    assert t.device.type == "cpu"
    assert proxy.zeros(2, device="cuda", pin_memory=True).device.type == "cpu"
    assert proxy.tensor([1.0], device=0).device.type == "cpu"
    assert proxy.float32 is torch.float32  # everything else is plain torch
    state = proxy.cuda.get_rng_state()
    a = torch.rand(2)
    proxy.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(2))


def test_refuses_other_megatron_versions():
    code = (
        "import megatron.core.package_info as p; p.__version__ = '0.99.0'\n"
        "from megatron_ext.cpu_backend import enable_cpu_backend\n"
        "try:\n    enable_cpu_backend(force=True)\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "megatron-core==0.16.1" in out.stdout
