"""Tests of the fused dW + per-sample-norm kernel (kernels/wgrad_sample_norm.py).

CPU: the kernel runs in Triton's interpreter. Triton picks interpreter vs compiler when
`@triton.jit` runs, i.e. when our kernel module is first imported, by reading
TRITON_INTERPRET (triton/knobs.py: `runtime.interpret = env_bool("TRITON_INTERPRET")`,
used in triton/runtime/jit.py's `jit` decorator). So we set it around our import and,
through an autouse fixture, during our tests only: later test modules then get the fast
PyTorch fallback on CPU (the launcher needs the variable set at call time too). If
another module imported the kernels earlier without it, the in-process kernel tests skip
and `test_interpreter_in_subprocess` reruns this file in a fresh interpreter process.
GPU: when CUDA is present the compiled kernel runs on larger shapes.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from gns_helpers import fp64_sample_truth as _fp64_truth
from gns_helpers import make_wgrad_inputs as _make

_HAS_CUDA = torch.cuda.is_available()
_prev = os.environ.get("TRITON_INTERPRET")
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
from megatron_ext.kernels import wgrad_sample_norm as wsn  # noqa: E402
from megatron_ext.kernels import (  # noqa: E402
    LinearWithSampleNorms,
    SampleNormAccumulator,
    kernel_backend,
    linear_with_sample_norms,
    wgrad_sample_norms,
    wgrad_sample_norms_reference,
)

if _prev is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _prev

_INTERP = wsn.kernel_is_interpreted()


@pytest.fixture(autouse=True)
def _interpreter_on(monkeypatch):
    if _INTERP:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield

needs_interp = pytest.mark.skipif(not _INTERP, reason="kernel module was imported without TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA and the compiled kernel")

# (s, b, d_in, d_out): b=1, s not a multiple of the 16-token test block, d not powers of 2
CPU_SHAPES = [(37, 3, 45, 33), (5, 1, 16, 48), (17, 2, 20, 7)]
GPU_SHAPES = [(300, 3, 200, 136), (512, 4, 384, 640), (1000, 1, 1024, 72)]


def _check(res, x, dy, layout, dtype, bias=True):
    dw, nw, db, nb = _fp64_truth(x, dy, layout)
    dev = res.grad_weight.device
    dw_tol = dict(rtol=2e-2, atol=2e-2 * dw.abs().max().item()) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.grad_weight.double().cpu(), dw, **dw_tol)
    torch.testing.assert_close(res.sq_norms_weight.double().cpu(), nw, rtol=1e-3, atol=0)
    if bias:
        torch.testing.assert_close(res.grad_bias.double().cpu(), db, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(res.sq_norms_bias.double().cpu(), nb, rtol=1e-3, atol=0)
    assert res.sq_norms_weight.dtype == torch.float32 and res.sq_norms_weight.device == dev


def test_interpreter_took_effect_or_subprocess_covers_it():
    if _HAS_CUDA:
        assert kernel_backend(torch.zeros(1, device="cuda")) in ("triton", "triton-interpret")
    elif _INTERP:
        assert kernel_backend(torch.zeros(1)) == "triton-interpret"
        with pytest.MonkeyPatch.context() as mp:  # interpreter off again -> fallback
            mp.delenv("TRITON_INTERPRET")
            assert kernel_backend(torch.zeros(1)) == "torch-reference"
    else:
        assert kernel_backend(torch.zeros(1)) == "torch-reference"


@pytest.mark.skipif(_INTERP or _HAS_CUDA, reason="kernel already runs in the interpreter here")
def test_interpreter_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@needs_interp
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sbh", "bsh"])
def test_kernel_matches_fp64(shape, dtype, layout):
    x, dy = _make(*shape, dtype, layout)
    res = wgrad_sample_norms(x, dy, layout, compute_bias=True)
    assert res.grad_weight.dtype == dtype
    _check(res, x, dy, layout, dtype)
    ref = wgrad_sample_norms_reference(x, dy, layout, compute_bias=True)
    torch.testing.assert_close(res.sq_norms_weight, ref.sq_norms_weight, rtol=1e-4, atol=0)


@needs_interp
def test_kernel_fp16_no_bias():
    x, dy = _make(21, 2, 24, 40, torch.float16, "sbh")
    res = wgrad_sample_norms(x, dy)
    assert res.grad_bias is None and res.sq_norms_bias is None
    _check(res, x, dy, "sbh", torch.float16, bias=False)


@needs_interp
def test_kernel_strided_views_no_copy():
    # x is a column slice of a wider buffer and dy a transposed view of a [b, s, h] tensor.
    g = torch.Generator().manual_seed(1)
    big = torch.randn(19, 2, 50, generator=g)
    x = big[:, :, 3:40]  # [s, b, 37], strides (100, 50, 1)
    dy = torch.randn(2, 19, 23, generator=g).transpose(0, 1)  # [s, b, 23] view
    res = wgrad_sample_norms(x, dy, "sbh", compute_bias=True)
    _check(res, x, dy, "sbh", torch.float32)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_main_grad_accumulates_in_place(dtype):
    x, dy = _make(13, 2, 18, 34, dtype, "sbh")
    main_grad = torch.randn(34, 18)
    start = main_grad.clone()
    res = wgrad_sample_norms(x, dy, main_grad=main_grad)
    assert res.grad_weight is main_grad
    dw, nw, _, _ = _fp64_truth(x, dy, "sbh")
    torch.testing.assert_close(main_grad.double(), start.double() + dw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.sq_norms_weight.double(), nw, rtol=1e-3, atol=0)


@needs_interp
@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_split_atomics(split, dtype):
    # Samples spread over programs (never the tokens of one sample): same results.
    x, dy = _make(19, 3, 22, 35, dtype, "bsh", seed=2)
    res = wgrad_sample_norms(x, dy, "bsh", compute_bias=True, split_samples=split)
    assert res.grad_weight.dtype == dtype
    _check(res, x, dy, "bsh", dtype)
    main_grad = torch.full((35, 22), 0.5)
    res = wgrad_sample_norms(x, dy, "bsh", main_grad=main_grad, split_samples=split)
    dw, nw, _, _ = _fp64_truth(x, dy, "bsh")
    torch.testing.assert_close(main_grad.double(), 0.5 + dw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.sq_norms_weight.double(), nw, rtol=1e-3, atol=0)


# TMA path: D a multiple of 16 bytes (8 bf16 / 4 fp32 values) but not of the 16-wide test
# tile, so tiles read the next sample's features, which the epilogue must mask.
TMA_SHAPES = [(37, 3, 40, 24), (5, 1, 8, 56), (17, 2, 24, 8)]


@needs_interp
@pytest.mark.parametrize("shape", TMA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_path_matches_fp64(shape, dtype):
    x, dy = _make(*shape, dtype, "sbh")
    for split in (1, 2):
        res = wgrad_sample_norms(x, dy, compute_bias=True, tma=True, split_samples=split)
        _check(res, x, dy, "sbh", dtype)
    main_grad = torch.full((shape[3], shape[2]), 0.25)
    res = wgrad_sample_norms(x, dy, main_grad=main_grad, tma=True)
    dw, nw, _, _ = _fp64_truth(x, dy, "sbh")
    torch.testing.assert_close(main_grad.double(), 0.25 + dw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.sq_norms_weight.double(), nw, rtol=1e-3, atol=0)


@needs_interp
def test_tma_refuses_layouts_it_cannot_read():
    x, dy = _make(9, 2, 16, 8, torch.float32, "bsh")
    with pytest.raises(ValueError, match="tma=True needs contiguous"):
        wgrad_sample_norms(x, dy, "bsh", tma=True)
    x, dy = _make(9, 2, 18, 8, torch.bfloat16, "sbh")  # 18 bf16 = 36 bytes per sample row
    with pytest.raises(ValueError, match="16-byte"):
        wgrad_sample_norms(x, dy, tma=True)
    # auto mode quietly keeps the cp.async path for them
    _check(wgrad_sample_norms(x, dy, compute_bias=True), x, dy, "sbh", torch.bfloat16)


@needs_interp
@pytest.mark.parametrize("split", [1, 2])
def test_dw_only_mode_skips_norms(split):
    # compute_norms=False is the benchmark's Triton-GEMM baseline: same dW/db, no norms.
    x, dy = _make(23, 3, 20, 18, torch.float32, "sbh", seed=3)
    res = wgrad_sample_norms(x, dy, compute_bias=True, compute_norms=False, split_samples=split)
    dw, _, db, _ = _fp64_truth(x, dy, "sbh")
    torch.testing.assert_close(res.grad_weight.double(), dw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.grad_bias.double(), db, rtol=1e-4, atol=1e-3)
    assert not res.sq_norms_weight.any() and not res.sq_norms_bias.any()


def test_reference_matches_fp64_and_validates():
    x, dy = _make(9, 3, 10, 6, torch.float32, "bsh")
    _check(wgrad_sample_norms_reference(x, dy, "bsh", compute_bias=True), x, dy, "bsh", torch.float32)
    with pytest.raises(ValueError, match="layout"):
        wgrad_sample_norms(x, dy, "hbs")
    with pytest.raises(ValueError, match="disagree"):
        wgrad_sample_norms(x, dy[:, :-1], "bsh")
    with pytest.raises(ValueError, match="main_grad"):
        wgrad_sample_norms(x, dy, "bsh", main_grad=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="split_samples"):
        wgrad_sample_norms(x, dy, "bsh", split_samples=0)


def _per_sample_autograd_norms(x, w, b, g, layout):
    """‖∂L_i/∂W‖² + ‖∂L_i/∂b‖² for L_i = <y_i, g_i>, one fp64 autograd call per sample."""
    out = []
    nb = x.shape[1] if layout == "sbh" else x.shape[0]
    for i in range(nb):
        sl = (slice(None), slice(i, i + 1)) if layout == "sbh" else (slice(i, i + 1),)
        w64 = w.detach().double().requires_grad_()
        b64 = b.detach().double().requires_grad_()
        (F.linear(x[sl].double(), w64, b64) * g[sl].double()).sum().backward()
        out.append(w64.grad.square().sum() + b64.grad.square().sum())
    return torch.stack(out)


def _run_linear(shape, dtype, layout, device="cpu"):
    s, b, d_in, d_out = shape
    x, g = _make(s, b, d_in, d_out, dtype, layout, device=device, seed=3)
    w = (torch.randn(d_out, d_in) / d_in**0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(d_out).to(device=device, dtype=dtype).requires_grad_()
    x.requires_grad_()
    sink = SampleNormAccumulator()
    y = LinearWithSampleNorms.apply(x, w, bias, sink, layout)
    torch.testing.assert_close(y, F.linear(x, w, bias))
    y.backward(g)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    F.linear(x2, w2, b2).backward(g)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (bias.grad, b2.grad)):
        torch.testing.assert_close(got.float(), want.float(), **tol)
    want = _per_sample_autograd_norms(x.detach(), w, bias, g, layout)
    assert sink.num_calls == 1
    torch.testing.assert_close(sink.total.double().cpu(), want.cpu(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("layout", ["sbh", "bsh"])
def test_linear_autograd_and_sink(layout):
    # Runs the kernel (interpreter) or the reference fallback, whichever this process has.
    _run_linear((11, 3, 20, 9), torch.float32, layout)


def test_linear_gradient_accumulation_fusion():
    x, g = _make(7, 2, 12, 10, torch.float32, "sbh", seed=4)
    w = torch.randn(10, 12, requires_grad=True)
    w.main_grad = torch.ones(10, 12)
    w.grad_added_to_main_grad = False
    sink = SampleNormAccumulator()
    y = linear_with_sample_norms(x, w, None, sink, gradient_accumulation_fusion=True)
    y.backward(g)
    dw, nw, _, _ = _fp64_truth(x, g, "sbh")
    torch.testing.assert_close(w.main_grad.double(), 1 + dw, rtol=1e-4, atol=1e-4)
    assert w.grad_added_to_main_grad is True and w.grad.shape == (10, 12)
    torch.testing.assert_close(sink.total.double(), nw, rtol=1e-3, atol=0)
    sink.reset()
    assert sink.total is None and sink.num_calls == 0


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sbh", "bsh"])
def test_gpu_kernel_matches_fp64(shape, dtype, layout):
    x, dy = _make(*shape, dtype, layout, device="cuda")
    _check(wgrad_sample_norms(x, dy, layout, compute_bias=True), x, dy, layout, dtype)
    main_grad = torch.zeros(shape[3], shape[2], device="cuda")
    res = wgrad_sample_norms(x, dy, layout, main_grad=main_grad)
    _check(res._replace(grad_weight=main_grad), x, dy, layout, dtype, bias=False)
    _check(wgrad_sample_norms(x, dy, layout, compute_bias=True, split_samples=2), x, dy, layout, dtype)


@needs_cuda
@pytest.mark.skipif(not _HAS_CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA needs Hopper")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_tma_and_cp_async_paths(shape, tma):
    x, dy = _make(*shape, torch.bfloat16, "sbh", device="cuda")
    _check(wgrad_sample_norms(x, dy, compute_bias=True, tma=tma), x, dy, "sbh", torch.bfloat16)
    main_grad = torch.zeros(shape[3], shape[2], device="cuda")
    res = wgrad_sample_norms(x, dy, main_grad=main_grad, tma=tma, split_samples=2)
    _check(res._replace(grad_weight=main_grad), x, dy, "sbh", torch.bfloat16, bias=False)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear(dtype):
    _run_linear((129, 2, 96, 80), dtype, "sbh", device="cuda")


def test_tma_mode_decision():
    from megatron_ext.kernels.wgrad_sample_norm_tuning import _tma_eligible, _tma_mode

    x, dy = _make(9, 4, 64, 32, torch.bfloat16, "sbh")  # [s, b, h] contiguous
    xs, ys = (4 * 64, 64, 1), (4 * 32, 32, 1)
    assert _tma_eligible(x, xs, 64, 4) and _tma_eligible(dy, ys, 32, 4)
    assert not _tma_eligible(x, (4 * 64, 64, 2), 64, 4)  # feature stride
    assert not _tma_eligible(x, (64, 9 * 64, 1), 64, 4)  # [b, s, h]: samples not side by side
    x_odd = torch.empty(9, 4, 20, dtype=torch.bfloat16)  # 40-byte sample rows
    assert not _tma_eligible(x_odd, (80, 20, 1), 20, 4)
    # CPU / interpreter: auto keeps cp.async (one config), True forces TMA, False never
    assert _tma_mode(x, dy, xs, ys, 4, 64, 32, None, interpreted=True) == 0
    assert _tma_mode(x, dy, xs, ys, 4, 64, 32, True, interpreted=True) == 1
    assert _tma_mode(x, dy, xs, ys, 4, 64, 32, False, interpreted=True) == 0
    with pytest.raises(ValueError, match="tma=True needs contiguous"):
        _tma_mode(x_odd, dy, (80, 20, 1), ys, 4, 20, 32, True, interpreted=True)
