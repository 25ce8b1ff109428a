"""Compile the Triton kernels for NVIDIA GPUs ahead of time, without a GPU.

Main API: `compile_wgrad_kernel(arch, dtype, config) -> dict` and the command line

    python tools/compile_kernels.py [--arch 80 90] [--dtype bf16 fp32] [--all-configs] [--dw-only]

For every (arch, dtype, autotune config) it runs Triton's full pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> cubin with the bundled ptxas) and prints the registers, spill bytes and
shared memory the cubin needs (from the bundled `cuobjdump --dump-resource-usage`). It
catches what the CPU interpreter cannot: lowering errors, shared memory over the limit and
register spills of the two fp32 accumulator tiles, before GPU time is spent. Exit status 1
if any compile fails.

Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions at import).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import List, Optional

_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _kernel_module():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels at import")
    from megatron_ext.kernels import wgrad_sample_norm as mod
    return mod


def _jit_fn(kernel):
    fn = kernel
    while not type(fn).__name__ == "JITFunction":
        fn = fn.fn
    return fn


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, parsed from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def compile_wgrad_kernel(arch: int, dtype: str, config, accumulate: bool = True,
                         has_bias: bool = False, split_out: bool = False,
                         norms: bool = True) -> dict:
    """Compile `_wgrad_sample_norm_kernel` for sm_`arch` with one autotune config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = _kernel_module()
    fn = _jit_fn(mod._wgrad_sample_norm_kernel)
    elt = _DTYPES[dtype]
    out_elt = "fp32" if (accumulate or split_out) else elt
    ptr_types = {"x_ptr": f"*{elt}", "dy_ptr": f"*{elt}", "out_ptr": f"*{out_elt}",
                 "db_ptr": "*fp32", "norm_w_ptr": "*fp32", "norm_b_ptr": "*fp32"}
    constexprs = {"ACCUMULATE": accumulate, "SPLIT_OUT": split_out, "HAS_BIAS": has_bias,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                  "UPCAST_DOT": False, "NORMS": norms,
                  "TMA_MODE": 1 if config.kwargs.get("USE_TMA") else 0, **config.kwargs}
    # Specialise like a JIT launch on contiguous [s, b, h] tensors of the benchmark shapes:
    # integer arguments equal to 1 (the feature strides) become constants, the others and
    # all pointers carry the divisible-by-16 hint. Without these the loads cannot be
    # vectorised and the K loop is not software-pipelined.
    constexprs.update(stride_xh=1, stride_yh=1, stride_on=1)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = ptr_types.get(name, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={
        "num_warps": config.num_warps, "num_stages": config.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    usage["shared_meta"] = compiled.metadata.shared
    ttgir = compiled.asm["ttgir"]
    # cp.async (Ampere) / TMA copies into shared memory mean the loads are pipelined.
    usage["pipelined"] = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    usage["loads"] = "tma" if "async_tma_copy" in ttgir else "cp.async"
    usage["mma"] = "wgmma" if "warp_group_dot" in ttgir else "mma"
    return usage


def _arch_number(text: str) -> int:
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--arch wants 80, 90, sm_90a, ...; got {text!r}")
    return int(m.group(1))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", type=_arch_number, default=[80, 90],
                   help="compute capabilities to compile for (80 = A100, 90 = H100)")
    p.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=["bf16", "fp32"])
    p.add_argument("--dw-only", action="store_true",
                   help="compile the dW-only mode (per-sample epilogue off) for comparison")
    p.add_argument("--all-configs", action="store_true",
                   help="every autotune config (default: the first one of each arch's set)")
    args = p.parse_args(argv)
    import triton

    mod = _kernel_module()
    configs = mod._gpu_configs()
    print(f"triton {triton.__version__}: {mod._wgrad_sample_norm_kernel.__class__.__name__} "
          f"with {len(configs)} autotune configs")
    failures = 0
    for arch in args.arch:
        for dtype in args.dtype:
            # The launcher's pruning: BLOCK_K=64 on Hopper for 16-bit inputs, else 32; TMA
            # configs on Hopper for 16-bit inputs only.
            elt = 4 if dtype == "fp32" else 2
            bk = mod._block_k_for(arch // 10, elt)
            arch_cfgs = [c for c in configs if (c.kwargs["USE_TMA"] and arch >= 90 and elt == 2)
                         or (not c.kwargs["USE_TMA"] and c.kwargs["BLOCK_K"] == bk)]
            if not args.all_configs:  # the first config of each load path
                arch_cfgs = [next(c for c in arch_cfgs if c.kwargs["USE_TMA"] == t)
                             for t in (False, True)
                             if any(c.kwargs["USE_TMA"] == t for c in arch_cfgs)]
            for cfg in arch_cfgs:
                k = cfg.kwargs
                name = (f"sm_{arch} {dtype:<4} {k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} "
                        f"w{cfg.num_warps} s{cfg.num_stages}{' tma' if k['USE_TMA'] else ''}")
                try:
                    u = compile_wgrad_kernel(arch, dtype, cfg, norms=not args.dw_only)
                except Exception as e:  # report every config, fail at the end
                    failures += 1
                    msg = str(e).strip().splitlines()
                    print(f"{name}: FAILED {type(e).__name__}: {msg[-1] if msg else ''}")
                    continue
                print(f"{name}: ok  {u['mma']:<5} {u['loads']:<8} pipelined {str(u['pipelined']):<5} regs "
                      f"{u['reg']}  stack {u['stack']} B  smem {u['shared_meta'] / 1024:.0f} KiB")
    sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
