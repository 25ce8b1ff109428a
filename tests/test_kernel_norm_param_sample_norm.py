"""Tests of per-sample bias / LayerNorm / RMSNorm gradient norms (pure PyTorch, CPU)."""
import pytest
import torch
import torch.nn.functional as F

# Import the submodule, not the package's kernel modules: it needs no Triton.
from megatron_ext.kernels import norm_param_sample_norm as nps
from megatron_ext.kernels.norm_param_sample_norm import (
    bias_sample_norms,
    layer_norm_xhat,
    norm_param_sample_norms,
    norm_param_sample_norms_reference,
    rms_norm_xhat,
)


def _rand(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("layout", ["sbh", "bsh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_beta", [True, False])
def test_matches_fp64_loop(layout, dtype, has_beta, monkeypatch):
    monkeypatch.setattr(nps, "_CHUNK_ELEMENTS", 50)  # force several token chunks
    shape = (13, 3, 21) if layout == "sbh" else (3, 13, 21)
    dy, xh = _rand(shape, dtype, 0), _rand(shape, dtype, 1)
    got = norm_param_sample_norms(dy, xh, layout, has_beta=has_beta)
    ref = norm_param_sample_norms_reference(dy, xh, layout, has_beta=has_beta)
    torch.testing.assert_close(got.grad_gamma, ref.grad_gamma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.sq_norms_gamma, ref.sq_norms_gamma, rtol=1e-3, atol=0)
    if has_beta:
        torch.testing.assert_close(got.grad_beta, ref.grad_beta, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.sq_norms_beta, ref.sq_norms_beta, rtol=1e-3, atol=0)
    else:
        assert got.grad_beta is None and got.sq_norms_beta is None


def test_bias_sample_norms_b1():
    dy = _rand((9, 1, 5), torch.float32, 2)
    grad, sq = bias_sample_norms(dy)
    torch.testing.assert_close(grad, dy.sum((0, 1)))
    torch.testing.assert_close(sq, dy.sum(0).square().sum(-1))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_end_to_end_against_autograd_per_sample(kind):
    # Per-sample γ/β grads of a real norm layer, from one fp64 autograd call per sample.
    s, b, h, eps = 7, 3, 10, 1e-5
    x, g = _rand((s, b, h), torch.float64, 3), _rand((s, b, h), torch.float64, 4)
    gamma = 1 + 0.1 * _rand((h,), torch.float64, 5)
    beta = 0.1 * _rand((h,), torch.float64, 6)
    want_g, want_b = [], []
    for i in range(b):
        gm, bt = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        xi = x[:, i : i + 1]
        if kind == "layer":
            y = F.layer_norm(xi, (h,), gm, bt, eps)
        else:
            y = xi * torch.rsqrt(xi.square().mean(-1, keepdim=True) + eps) * gm
        (y * g[:, i : i + 1]).sum().backward()
        want_g.append(gm.grad.square().sum())
        want_b.append(bt.grad.square().sum() if bt.grad is not None else torch.tensor(0.0))
    xhat = layer_norm_xhat(x, eps) if kind == "layer" else rms_norm_xhat(x, eps)
    got = norm_param_sample_norms(g, xhat, "sbh", has_beta=kind == "layer")
    torch.testing.assert_close(got.sq_norms_gamma.double(), torch.stack(want_g), rtol=1e-3, atol=0)
    if kind == "layer":
        torch.testing.assert_close(got.sq_norms_beta.double(), torch.stack(want_b), rtol=1e-3, atol=0)


def test_validation():
    with pytest.raises(ValueError, match="layout"):
        norm_param_sample_norms(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2), "bhs")
    with pytest.raises(ValueError, match="must match"):
        norm_param_sample_norms(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="3D"):
        bias_sample_norms(torch.zeros(2, 2))
