"""Fused weight gradient + per-sample squared gradient norms for a linear layer.

Main API:
    wgrad_sample_norms(x, dy, layout="sbh", *, main_grad=None, compute_bias=False,
                       split_samples=None, compute_norms=True, tma=None)
        -> WgradSampleNorms(grad_weight, sq_norms_weight, grad_bias, sq_norms_bias)
    wgrad_sample_norms_reference(...)  same contract, pure PyTorch (fp32 loop over samples)
    kernel_backend(tensor) -> "triton" | "triton-interpret" | "torch-reference"

For y = x Wᵀ with x: [s, b, d_in] and dy: [s, b, d_out] the weight gradient is
dW = Σ_i dW_i with dW_i = Σ_t dy[t, i]ᵀ x[t, i]. The per-sample squared norms
n[i] = ‖dW_i‖²_F are what gradient-noise-scale estimation needs (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training", App. A). Unlike per-sample bmm or the
"ghost norm" trick (Goodfellow 2015; Li et al. 2022), which need an extra [d_out, d_in] or
[s, s] product per sample, the kernel gets them for a few register ops: each
program owns one [BLOCK_M, BLOCK_N] tile of dW and walks the samples one after the other;
for a sample it runs the whole token (K) loop into a fresh fp32 tile, so that tile is the
exact restriction of dW_i; it then adds Σ tile² to n[i] (atomic, other tiles add theirs)
and adds the tile into the running dW tile. K is never split across programs: a partial
tile squared would not give ‖dW_i‖².

Tiles reach shared memory by cp.async (any strides) or, on Hopper with Megatron's contiguous
[s, b, h] activations, by TMA; the autotuner picks (`tma=` forces one, see
`wgrad_sample_norm_tuning.py`).

Backends (`kernel_backend(t)` says which): on CUDA tensors the compiled Triton kernel
runs. Triton decides at decoration time (module import) whether kernels run in its CPU
interpreter, so TRITON_INTERPRET=1 must be set *before* this module is imported; the
interpreter is then used while the variable stays set (slow; tests only). Otherwise CPU
tensors fall back to the `_reference` PyTorch implementation, so CPU runs still work.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # Triton is optional at run time: without it everything uses the PyTorch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the venv ships triton
    triton = None
    tl = None

from .wgrad_sample_norm_reference import (  # noqa: F401  (re-exported)
    WgradSampleNorms,
    _check,
    _sample_strides,
    wgrad_sample_norms_reference,
)
from .wgrad_sample_norm_tuning import (
    _autotune_cache_kwargs,
    _block_k_for,  # noqa: F401  (tools/compile_kernels.py mirrors the pruning)
    _config,
    _ensure_tma_allocator,
    _gpu_configs,
    _interpreting,
    _prune_configs,
    _tma_mode,
)


if triton is not None:
    # Under the interpreter every config is re-run on the CPU while tuning (and Triton 3.6
    # benchmarks whenever there are several, which needs a GPU driver): one small config
    # keeps tests fast and exercises the masks (tiles bigger than nothing, smaller than the
    # test shapes); the launcher then passes USE_TMA itself.
    _CONFIGS = [_config(16, 16, 16, 1, 1, group_m=2, tma=None)] if _interpreting() else _gpu_configs()

    @triton.autotune(
        configs=_CONFIGS,
        key=["S", "D_OUT", "D_IN", "SPLIT_OUT", "NORMS", "TMA_MODE"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # Tuning runs the kernel many times: the norm buffers must restart at zero and an
        # accumulated main_grad must be put back.
        reset_to_zero=["norm_w_ptr", "norm_b_ptr", "db_ptr"],
        restore_value=["out_ptr"],
        # The tuning result of each key is kept in Triton's cache directory
        # (`_persistent_cache_dir`), so later processes skip the 10-20 s of tuning.
        **_autotune_cache_kwargs(),
    )
    @triton.jit
    def _wgrad_sample_norm_kernel(
        x_ptr,  # [s, b, d_in] with any strides
        dy_ptr,  # [s, b, d_out] with any strides
        out_ptr,  # [d_out, d_in] dW (fp32 main_grad or a fresh tensor; fp32 zeros if SPLIT_OUT)
        db_ptr,  # [d_out] fp32 bias grad (unused unless HAS_BIAS; zeros if SPLIT_OUT)
        norm_w_ptr,  # [b] fp32, zeroed by the launcher
        norm_b_ptr,  # [b] fp32, zeroed by the launcher (unused unless HAS_BIAS)
        S, B, D_IN, D_OUT,
        stride_xs, stride_xb, stride_xh,
        stride_ys, stride_yb, stride_yh,
        stride_om, stride_on,
        ACCUMULATE: tl.constexpr,
        SPLIT_OUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        NORMS: tl.constexpr,
        TMA_MODE: tl.constexpr,  # launcher's choice, read by the config pruning (key only)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        # Grouped tile order (Triton matmul tutorial): neighbouring programs share dy
        # column blocks in L2.
        pid = tl.program_id(0)
        # Axis 1 splits the *samples* (never the tokens of one sample) over programs for
        # small layers: sample i goes to split i % n_split; partial dW tiles then meet
        # in out_ptr through fp32 atomics (SPLIT_OUT).
        pid_s = tl.program_id(1)
        n_split = tl.num_programs(1)
        my_samples = (B - pid_s + n_split - 1) // n_split
        num_pid_m = tl.cdiv(D_OUT, BLOCK_M)
        num_pid_n = tl.cdiv(D_IN, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # d_out rows of dW
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # d_in columns of dW
        offs_k = tl.arange(0, BLOCK_K)  # tokens of one sample
        mask_m = offs_m < D_OUT
        mask_n = offs_n < D_IN
        mask_out = mask_m[:, None] & mask_n[None, :]
        # Only the first column of programs computes the bias gradient (it reads the
        # same dy tiles anyway), so the extra work is 1/num_pid_n of a cheap reduction.
        do_bias = pid_n == 0

        k_tiles = tl.cdiv(S, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # Σ_i dW_i tile
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dW_i tile of the sample
        bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        bias_part = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if USE_TMA:
            # Samples side by side in a token row ([s, b, h] contiguous over (b, h)), so a
            # 2D view [S, B*D] serves every sample: sample i's tile starts at column i*D.
            # Rows past S are zero-filled; columns past D belong to sample i+1 (or are zero
            # past B*D): they only reach dW rows/columns that the epilogue masks.
            dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[S, B * D_OUT], strides=[stride_ys, 1],
                                                block_shape=[BLOCK_K, BLOCK_M])
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[S, B * D_IN], strides=[stride_xs, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        # One flat loop over (sample, token tile) instead of two nested loops: the
        # software pipeliner then keeps prefetching across sample boundaries (same
        # pattern as the persistent-matmul tutorial's tile epilogue).
        for it in range(0, my_samples * k_tiles):
            j = it // k_tiles
            kk = it - j * k_tiles
            i = pid_s + j * n_split  # sample index
            t = (kk * BLOCK_K + offs_k).to(tl.int64)  # int64: s*b*h may exceed 2^31
            mask_t = t < S
            base_i = i.to(tl.int64)
            if USE_TMA:
                a = tl.trans(dy_desc.load([kk * BLOCK_K, i * D_OUT + pid_m * BLOCK_M]))
                xt = x_desc.load([kk * BLOCK_K, i * D_IN + pid_n * BLOCK_N])
            else:
                # dyᵀ tile [BLOCK_M, BLOCK_K]: rows = output features, cols = tokens
                a = tl.load(
                    dy_ptr + base_i * stride_yb + t[None, :] * stride_ys + offs_m[:, None] * stride_yh,
                    mask=mask_m[:, None] & mask_t[None, :],
                    other=0.0,
                )
                # x tile [BLOCK_K, BLOCK_N]
                xt = tl.load(
                    x_ptr + base_i * stride_xb + t[:, None] * stride_xs + offs_n[None, :] * stride_xh,
                    mask=mask_t[:, None] & mask_n[None, :],
                    other=0.0,
                )
            if UPCAST_DOT:
                # Triton 3.9's interpreter multiplies bf16 tiles as raw uint16; fp32
                # operands give the same (exact) products.
                part = tl.dot(a.to(tl.float32), xt.to(tl.float32), part, input_precision=DOT_PRECISION)
            else:
                part = tl.dot(a, xt, part, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                if do_bias:
                    bias_part += tl.sum(a.to(tl.float32), axis=1)
            if NORMS:
                if kk == k_tiles - 1:
                    # The tile now holds all tokens of sample i: square it, fold it in.
                    if USE_TMA:  # zero the other sample's columns / rows before squaring
                        sq = tl.where(mask_out, part, 0.0)
                    else:
                        sq = part
                    # Relaxed: no other memory access is ordered against this add, and the
                    # default acq_rel costs fences at every sample boundary.
                    tl.atomic_add(norm_w_ptr + i, tl.sum(tl.sum(sq * sq, axis=1), axis=0),
                                  sem="relaxed")
                    acc += part
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    if HAS_BIAS:
                        if do_bias:
                            if USE_TMA:
                                sqb = tl.where(mask_m, bias_part, 0.0)
                            else:
                                sqb = bias_part
                            tl.atomic_add(norm_b_ptr + i, tl.sum(sqb * sqb, axis=0),
                                          sem="relaxed")
                            bias_acc += bias_part
                            bias_part = tl.zeros((BLOCK_M,), dtype=tl.float32)

        if not NORMS:  # dW only (benchmark baseline): `part` summed every sample
            acc = part
            bias_acc = bias_part
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        if SPLIT_OUT:  # fp32 out: zeros or main_grad; other splits add their share
            tl.atomic_add(out_ptrs, acc, mask=mask_out, sem="relaxed")
        else:
            if ACCUMULATE:  # Megatron gradient-accumulation fusion: main_grad += dW
                acc += tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
        if HAS_BIAS:
            if do_bias:
                if SPLIT_OUT:
                    tl.atomic_add(db_ptr + offs_m, bias_acc, mask=mask_m, sem="relaxed")
                else:
                    tl.store(db_ptr + offs_m, bias_acc, mask=mask_m)
else:  # pragma: no cover
    _wgrad_sample_norm_kernel = None


# ----------------------------------------------------------------------------- helpers
def kernel_is_interpreted() -> bool:
    """True when this module's kernel was built by Triton's CPU interpreter."""
    if _wgrad_sample_norm_kernel is None:
        return False
    fn = _wgrad_sample_norm_kernel
    while hasattr(fn, "fn") and not type(fn).__name__.endswith("Function"):
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def kernel_backend(t: torch.Tensor) -> str:
    """Which implementation `wgrad_sample_norms` uses for tensors like `t` (for logs).

    "triton-interpret" needs both: the kernel was built by the interpreter (env set at
    import) and TRITON_INTERPRET=1 is still set now. So a test that turned the
    interpreter on only for itself does not slow down later CPU users, who get the
    PyTorch reference.
    """
    if _wgrad_sample_norm_kernel is None:
        return "torch-reference"
    if kernel_is_interpreted():
        return "triton-interpret" if _interpreting() else "torch-reference"
    return "triton" if t.is_cuda else "torch-reference"


# ----------------------------------------------------------------------------- launcher
def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's TF32 switch so results match `dyᵀ @ x` in the same run.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _auto_split(x: torch.Tensor, b: int, d_out: int, d_in: int) -> int:
    """Sample splits so that a small layer still fills the GPU (1 when it already does)."""
    if not x.is_cuda or b < 2:
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = triton.cdiv(d_out, 128) * triton.cdiv(d_in, 128)  # with the largest tiles
    if 2 * tiles >= sms:
        return 1
    return min(b, triton.cdiv(sms, tiles))


def wgrad_sample_norms(
    x: torch.Tensor,
    dy: torch.Tensor,
    layout: str = "sbh",
    *,
    main_grad: Optional[torch.Tensor] = None,
    compute_bias: bool = False,
    split_samples: Optional[int] = None,
    compute_norms: bool = True,
    tma: Optional[bool] = None,
) -> WgradSampleNorms:
    """dW = Σ_t dy[t]ᵀ x[t] plus per-sample ‖dW_i‖² (and db, ‖db_i‖²) in one pass.

    Args:
        x: layer input, [s, b, d_in] (layout "sbh", Megatron) or [b, s, d_in] ("bsh");
           bf16/fp16/fp32, any strides (no copy is made).
        dy: output gradient, [s, b, d_out] / [b, s, d_out], same dtype as x.
        layout: "sbh" or "bsh", which axis of the 3D tensors indexes samples.
        main_grad: optional [d_out, d_in] buffer (fp32 in Megatron); dW is added to it in
           place and it is returned as `grad_weight` (gradient-accumulation fusion).
        compute_bias: also return db = Σ dy (fp32) and ‖db_i‖².
        split_samples: spread the samples over this many programs per dW tile (partial
           tiles meet via fp32 atomics; dW then is not bitwise deterministic). None picks
           a split only when the layer has too few tiles to fill the GPU; 1 turns it off.
        compute_norms: False skips the per-sample epilogue (norms stay zero): the same
           kernel as a plain dW GEMM, the benchmark's baseline for the norms' own cost
           (the PyTorch reference path ignores it).
        tma: None lets the autotuner also try the TMA configs on Hopper when x and dy are
           contiguous [s, b, h]; True forces them (ValueError if the layout does not
           allow it; also runs in the interpreter), False keeps the cp.async configs.
    Returns:
        WgradSampleNorms; `grad_weight` has x's dtype unless main_grad was given.
        The norms are summed over tiles with fp32 atomics (order may vary run to run).
    """
    s, b, d_in, d_out = _check(x, dy, layout, main_grad)
    if x.dtype != dy.dtype:
        raise ValueError(f"x ({x.dtype}) and dy ({dy.dtype}) must share a dtype")
    if split_samples is not None and split_samples < 1:
        raise ValueError(f"split_samples must be >= 1 or None, got {split_samples}")
    if kernel_backend(x) == "torch-reference" or s == 0 or b == 0:
        return wgrad_sample_norms_reference(x, dy, layout, main_grad=main_grad, compute_bias=compute_bias)
    (sxs, sxb, sxh), _ = _sample_strides(x, layout)
    (sys_, syb, syh), _ = _sample_strides(dy, layout)
    interpreted = kernel_is_interpreted()
    tma_mode = _tma_mode(x, dy, (sxs, sxb, sxh), (sys_, syb, syh), b, d_in, d_out, tma,
                         interpreted=interpreted)
    if tma_mode and x.is_cuda:
        _ensure_tma_allocator()
    dev = x.device
    n_split = min(b, split_samples if split_samples is not None else _auto_split(x, b, d_out, d_in))
    if main_grad is not None and main_grad.dtype != torch.float32:
        n_split = 1  # the atomic path adds in fp32
    split = n_split > 1
    if main_grad is not None:
        out = main_grad
    elif split:
        out = torch.zeros(d_out, d_in, dtype=torch.float32, device=dev)
    else:
        out = torch.empty(d_out, d_in, dtype=x.dtype, device=dev)
    norms = torch.zeros(b, dtype=torch.float32, device=dev)
    db = (torch.zeros if split else torch.empty)(d_out, dtype=torch.float32, device=dev) if compute_bias else norms
    norms_b = torch.zeros(b, dtype=torch.float32, device=dev) if compute_bias else norms

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_M"]) * triton.cdiv(d_in, meta["BLOCK_N"]), n_split)

    _wgrad_sample_norm_kernel[grid](
        x, dy, out, db, norms, norms_b,
        s, b, d_in, d_out,
        sxs, sxb, sxh,
        sys_, syb, syh,
        out.stride(0), out.stride(1),
        ACCUMULATE=main_grad is not None,
        SPLIT_OUT=split,
        HAS_BIAS=compute_bias,
        DOT_PRECISION=_dot_precision(x.dtype),
        # Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 (see the kernel).
        UPCAST_DOT=interpreted and x.dtype == torch.bfloat16,
        NORMS=compute_norms,
        TMA_MODE=tma_mode,
        **({"USE_TMA": tma_mode == 1} if interpreted else {}),
    )
    if main_grad is None and out.dtype != x.dtype:
        out = out.to(x.dtype)
    if compute_bias:
        return WgradSampleNorms(out, norms, db, norms_b)
    return WgradSampleNorms(out, norms, None, None)
