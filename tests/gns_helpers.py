"""Helpers of the GNS tests: run tests/dist/gns_worker.py under torchrun, compare results.

Main API: run_worker(tmp_path, nproc, *worker_flags, triton_interpret=False) -> dict,
assert_close(a, b, rtol=RTOL), run_python_check(code, marker, **env); for the dW +
per-sample-norm kernels and routes: make_wgrad_inputs(s, b, d_in, d_out, dtype, layout) and
fp64_sample_truth(x, dy, layout).
"""
import json
import math
import os
import subprocess
import sys

import torch
from launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist", "gns_worker.py")
RTOL = 1e-5


def run_worker(tmp_path, nproc, *args, triton_interpret=False):
    """Run the worker; the CPU path is the PyTorch reference unless `triton_interpret`."""
    out = tmp_path / f"gns_{nproc}_{'_'.join(a.strip('-') for a in args) or 'default'}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), WORKER, "--out", str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the PyTorch reference path is the CPU path
    if triton_interpret:  # the Triton kernels themselves, in Triton's CPU interpreter
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def assert_close(a, b, rtol=RTOL):
    assert a is not None and b is not None
    a, b = list(a) if isinstance(a, list) else [a], list(b) if isinstance(b, list) else [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol), (a, b)


def run_python_check(code: str, marker: str, timeout: int = 300, **env) -> None:
    """Run `code` in a fresh interpreter (with extra environment variables `env`).

    For checks that need a clean process: Triton's interpreter chosen at import, or
    megatron-core's parallel state. Passes when it exits 0 and prints `marker`.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0 and marker in out.stdout, out.stderr[-3000:]


def make_wgrad_inputs(s, b, d_in, d_out, dtype, layout, device="cpu", seed=0):
    """Random x [s, b, d_in] and dy [s, b, d_out] (or [b, s, h] for ``layout="bsh"``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, d_in, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(s, b, d_out, generator=g).to(device=device, dtype=dtype)
    if layout == "bsh":
        x, dy = x.transpose(0, 1).contiguous(), dy.transpose(0, 1).contiguous()
    return x, dy


def fp64_sample_truth(x, dy, layout):
    """dW, ‖dW_i‖², db, ‖db_i‖² from a fp64 loop over single samples."""
    if layout == "bsh":
        x, dy = x.transpose(0, 1), dy.transpose(0, 1)
    b = x.shape[1]
    dws = [dy[:, i].double().t() @ x[:, i].double() for i in range(b)]
    dbs = [dy[:, i].double().sum(0) for i in range(b)]
    return (sum(dws), torch.stack([w.square().sum() for w in dws]), sum(dbs),
            torch.stack([v.square().sum() for v in dbs]))
