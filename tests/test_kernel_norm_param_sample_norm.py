"""Tests of the LayerNorm / RMSNorm per-sample γ/β gradients (kernels/norm_param_sample_norm.py).

The Triton kernel runs in Triton's CPU interpreter in a fresh process (TRITON_INTERPRET=1
must be set before the kernel module is imported) and is compared with the PyTorch
reference; in this process the launcher runs whichever path the process has. Per-sample
norms are checked against an fp64 loop over single samples, and the autograd function's
dx / dγ / dβ against torch's own layer_norm / RMSNorm autograd.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_ext.kernels import norm_param_sample_norm as nps

from gns_helpers import run_python_check

EPS = 1e-5


def _rand(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _stats(x, layer: bool):
    """(mean or None, rstd) fp32 per-token statistics, as the forward saves them."""
    x32 = x.float()
    if layer:
        _, mean, rstd = torch.native_layer_norm(x32, [x.shape[-1]], None, None, EPS)
        return mean, rstd
    return None, torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)


def _torch_norm(x, gamma, beta, layer: bool):
    if layer:
        return F.layer_norm(x, (x.shape[-1],), gamma, beta, EPS)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * gamma


def _per_sample_fp64(x, dy, layer: bool):
    """[b] ‖dγ_i‖² + ‖dβ_i‖² from one fp64 autograd call per sample."""
    h = x.shape[-1]
    out = []
    for i in range(x.shape[1]):
        gamma = torch.ones(h, dtype=torch.float64, requires_grad=True)
        beta = torch.zeros(h, dtype=torch.float64, requires_grad=True) if layer else None
        y = _torch_norm(x[:, i:i + 1].double(), gamma, beta, layer)
        (y * dy[:, i:i + 1].double()).sum().backward()
        out.append(sum(p.grad.square().sum() for p in (gamma, beta) if p is not None))
    return torch.stack(out)


_KERNEL_CHECK = """
import torch
from megatron_ext.kernels import norm_param_sample_norm as nps
assert nps.norm_param_backend(torch.empty(1)) == "triton-interpret", "kernel not interpreted"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for s, b, h in ((37, 3, 50), (70, 2, 129)):  # masked edges and token-chunk splits
        dy, x = torch.randn(s, b, h).to(dtype), torch.randn(s, b, h).to(dtype)
        x32 = x.float()
        _, mean, rstd = torch.native_layer_norm(x32, [h], None, None, 1e-5)
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
        for m, r, beta in ((mean, rstd, True), (None, rms, False)):  # LayerNorm, RMSNorm
            g1, b1 = nps.norm_param_sample_grads(dy, x, m, r, beta)
            g2, b2 = nps.norm_param_sample_grads_reference(dy, x, m, r, beta)
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
            assert (b1 is None) == (not beta)
            if beta:
                torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-4)
        # non-contiguous sample stride: a [b, s, h] tensor seen as [s, b, h]
        g1, _ = nps.norm_param_sample_grads(dy.transpose(0, 1).contiguous().transpose(0, 1),
                                            x, mean, rstd, False)
        torch.testing.assert_close(g1, nps.norm_param_sample_grads_reference(
            dy, x, mean, rstd, False)[0], rtol=1e-4, atol=1e-4)
    # q/k layernorm: [s, b, heads, h], heads a strided slice of a wider tensor (Megatron
    # splits q, k, v out of one projection), and a 5-D input flattened to [s, b, n, h]
    for shape in ((9, 2, 3, 20), (5, 3, 2, 2, 12)):
        wide = torch.randn(*shape[:-1], 3 * shape[-1]).to(dtype)
        x = wide[..., : shape[-1]]  # stride(-2) = 3h: a view, not a copy
        dy = torch.randn(shape).to(dtype)
        _, mean, rstd = torch.native_layer_norm(x.float(), [shape[-1]], None, None, 1e-5)
        g1, b1 = nps.norm_param_sample_grads(dy, x, mean, rstd, True)
        g2, b2 = nps.norm_param_sample_grads_reference(dy, x, mean, rstd, True)
        assert g1.shape == (shape[1], shape[-1]), g1.shape
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-4)
print("NORM_KERNEL_OK")
"""


def test_kernel_matches_reference_in_interpreter():
    run_python_check(_KERNEL_CHECK, "NORM_KERNEL_OK", TRITON_INTERPRET="1")


_OFFSETS_CHECK = """
import torch
from megatron_ext.kernels import norm_param_sample_norm as nps, wgrad_sample_norm as wsn
assert nps.norm_param_backend(torch.empty(1)) == "triton-interpret"
# 4 GiB of virtual memory, only the touched pages are real: token 2 of this [3, 1, 16] view
# starts at element 2^31, so 32-bit offset arithmetic (2 * 2^30) wraps and reads elsewhere
# (a segfault before the int64 fix).
base = torch.empty(2**31 + 64, dtype=torch.bfloat16)
x = base.as_strided((3, 1, 16), (2**30, 16, 1))
x.copy_(torch.randn(3, 1, 16).to(torch.bfloat16))
rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
g1, _ = nps.norm_param_sample_grads(x, x, None, rstd, False)
g2, _ = nps.norm_param_sample_grads_reference(x, x, None, rstd, False)
torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
res = wsn.wgrad_sample_norms(x, x, "sbh", compute_bias=True)
ref = wsn.wgrad_sample_norms_reference(x, x, "sbh", compute_bias=True)
torch.testing.assert_close(res.sq_norms_weight, ref.sq_norms_weight, rtol=1e-4, atol=0)
print("OFFSETS_OK")
"""


def test_kernel_offsets_are_64_bit():
    """s*b*h >= 2^31 elements: the kernels' offsets must not wrap (runs in a subprocess:
    a wrapped offset reads unmapped memory)."""
    run_python_check(_OFFSETS_CHECK, "OFFSETS_OK", TRITON_INTERPRET="1")


@pytest.mark.parametrize("layer", [True, False], ids=["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 3, 50), (9, 1, 7), (7, 2, 3, 12)])
def test_per_sample_norms_match_fp64_loop(layer, dtype, shape):
    x, dy = _rand(shape, dtype, 1), _rand(shape, dtype, 2)
    mean, rstd = _stats(x, layer)
    dg, db = nps.norm_param_sample_grads(dy, x, mean, rstd, has_beta=layer)
    got = dg.double().square().sum(-1) + (db.double().square().sum(-1) if layer else 0)
    want = _per_sample_fp64(x, dy, layer)  # from the same rounded inputs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_function_matches_torch(normalization, zero_centered, dtype):
    layer = normalization == "LayerNorm"
    s, b, h = 13, 3, 21
    x = _rand((s, b, h), dtype, 3).requires_grad_()
    w = (0.1 * _rand((h,), dtype, 4) + (0 if zero_centered else 1)).requires_grad_()
    beta = (0.1 * _rand((h,), dtype, 5)).requires_grad_() if layer else None
    dy = _rand((s, b, h), dtype, 6)
    got = []
    y = nps.NormWithSampleNorms.apply(x, w, beta, got.append, normalization, EPS, zero_centered)
    y.backward(dy)
    # torch in fp32 on the same inputs (what SPNorm computes), rounded to the input dtype
    leaves = [t.detach().float().requires_grad_() for t in (x, w) + ((beta,) if layer else ())]
    gamma = leaves[1] + 1 if zero_centered else leaves[1]
    y_ref = _torch_norm(leaves[0], gamma, leaves[2] if layer else None, layer)
    y_ref.backward(dy.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref.to(dtype), **tol)
    for mine, ref in zip((x, w) + ((beta,) if layer else ()), leaves):
        assert mine.grad.dtype == dtype
        torch.testing.assert_close(mine.grad.float(), ref.grad, **tol)
    # the sink got the per-sample vectors: [b, h] (RMSNorm) or [b, 2h] (γ then β)
    assert len(got) == 1 and got[0].shape == (b, 2 * h if layer else h)
    torch.testing.assert_close(got[0][:, :h].sum(0), leaves[1].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_autograd_function_four_dim_qk_layernorm(normalization):
    """--qk-layernorm normalises [s, b, heads, head_dim]: one vector per sample, [b, h]."""
    layer = normalization == "LayerNorm"
    s, b, n, h = 5, 2, 3, 8
    x = _rand((s, b, n, h), torch.float32, 7).requires_grad_()
    w = (1 + 0.1 * _rand((h,), torch.float32, 8)).requires_grad_()
    beta = (0.1 * _rand((h,), torch.float32, 9)).requires_grad_() if layer else None
    dy = _rand((s, b, n, h), torch.float32, 10)
    got = []
    nps.NormWithSampleNorms.apply(x, w, beta, got.append, normalization, EPS).backward(dy)
    assert got[0].shape == (b, 2 * h if layer else h)
    want = _per_sample_fp64(x.detach(), dy, layer)
    torch.testing.assert_close(got[0].double().square().sum(-1), want, rtol=1e-5, atol=1e-7)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((beta,) if layer else ())]
    _torch_norm(leaves[0], leaves[1], leaves[2] if layer else None, layer).backward(dy)
    for mine, ref in zip((x, w) + ((beta,) if layer else ()), leaves):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_validation():
    x, w = torch.zeros(2, 2, 3), torch.ones(3)
    with pytest.raises(ValueError, match="normalization"):
        nps.NormWithSampleNorms.apply(x, w, None, None, "BatchNorm")
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        nps.NormWithSampleNorms.apply(x, w, torch.zeros(3), None, "RMSNorm")
