"""GNS layers in one process: norm layer and linear autograd function vs brute force."""
import os
import subprocess
import sys

import pytest
import torch

from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.gns import layers as gl
from megatron_ext.kernels import wgrad_sample_norms_reference
from megatron_ext.model.norms import SPNorm

S, B, H = 6, 3, 16


class FakeTracker:
    """Records what layers report; micro-batch 0 always."""

    def __init__(self):
        self.sq = torch.zeros(B, dtype=torch.float64)

    def microbatch_index(self, module):
        return 0 if torch.is_grad_enabled() else None

    def add_sq_norms(self, mb, sq, tp_duplicated=False):
        self.sq += sq.double()

    def add_grad_vectors(self, mb, vec):
        self.sq += vec.double().square().sum(-1)


@pytest.fixture(autouse=True)
def _tp1(monkeypatch):
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)


def _cfg(normalization, zero_centered=False):
    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2,
                             normalization=normalization,
                             layernorm_zero_centered_gamma=zero_centered)


@pytest.mark.parametrize("normalization,zc", [("LayerNorm", False), ("LayerNorm", True),
                                              ("RMSNorm", False)])
def test_gns_norm_matches_spnorm_and_brute_force(normalization, zc):
    torch.manual_seed(0)
    cfg = _cfg(normalization, zc)
    ref, gns = SPNorm(cfg, H), gl.GNSNorm(cfg, H)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    gns.load_state_dict(ref.state_dict())
    tracker = FakeTracker()
    gns.gns_tracker = tracker
    x = torch.randn(S, B, H, dtype=torch.float64).float()
    w = torch.randn(S, B, H)  # fixed random cotangent: loss = sum(out * w)
    xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_g = ref(xr), gns(xg)
    torch.testing.assert_close(out_g, out_r)
    (out_r * w).sum().backward()
    (out_g * w).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for pg, pr in zip(gns.parameters(), ref.parameters()):
        torch.testing.assert_close(pg.grad, pr.grad, rtol=1e-5, atol=1e-6)
    # brute force: one backward per sample on the reference module
    brute = []
    for i in range(B):
        ref.zero_grad()
        (ref(x[:, i:i + 1]) * w[:, i:i + 1]).sum().backward()
        brute.append(sum(float(p.grad.double().square().sum()) for p in ref.parameters()))
    torch.testing.assert_close(tracker.sq, torch.tensor(brute, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_function_gradient_accumulation_fusion(bias):
    torch.manual_seed(1)
    x = torch.randn(S, B, H, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, H))
    b = torch.nn.Parameter(torch.randn(8)) if bias else None
    weight.main_grad = torch.ones(8, H)  # fp32 main grad already holding earlier micro-batches
    weight.grad_added_to_main_grad = False
    got = []
    y = gl._LinearWithSampleNormsTP.apply(x, weight, b, True, False, False, None, got.append)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = wgrad_sample_norms_reference(x.detach(), dy, "sbh", compute_bias=bias)
    torch.testing.assert_close(weight.main_grad, 1 + ref.grad_weight, rtol=1e-5, atol=1e-5)
    assert weight.grad_added_to_main_grad is True  # Megatron's DDP hook then skips .grad
    expected = ref.sq_norms_weight + (ref.sq_norms_bias if bias else 0)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, dy @ weight.detach())
    if bias:
        torch.testing.assert_close(b.grad, dy.sum((0, 1)))


def test_gns_package_stays_import_light():
    code = ("import sys, megatron_ext.gns as g; assert 'torch' not in sys.modules; "
            "assert 'GNSTracker' in g.__all__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_KERNEL_CHECK = """
import torch
from megatron_ext.gns import norm_grads as ng
assert ng._use_triton(torch.empty(1)), "kernel not interpreted"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for s, b, h in ((37, 3, 50), (70, 2, 129)):  # masked edges and token-chunk splits
        dy, x = torch.randn(s, b, h).to(dtype), torch.randn(s, b, h).to(dtype)
        x32 = x.float()
        _, mean, rstd = torch.native_layer_norm(x32, [h], None, None, 1e-5)
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
        for m, r, beta in ((mean, rstd, True), (None, rms, False)):
            g1, b1 = ng.per_sample_norm_grads(dy, x, m, r, beta)
            g2, b2 = ng.per_sample_norm_grads_reference(dy, x, m, r, beta)
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
            assert (b1 is None) == (not beta)
            if beta:
                torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-4)
print("NORM_GRADS_OK")
"""


def test_norm_grads_triton_kernel_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "NORM_GRADS_OK" in out.stdout, out.stderr[-3000:]
