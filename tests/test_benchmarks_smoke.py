"""The GPU benchmark scripts still run: their `--cpu-smoke` modes on a tiny model, so a
GPU session does not spend its time on a broken script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


# bench_long_context.py and bench_gns_overhead.py --cpu-smoke: tests/test_gpu_run.py runs
# them as stages of benchmarks/gpu_run.py and checks their rows.


def test_kernel_benchmark_without_cuda_exits_cleanly():
    if __import__("torch").cuda.is_available():
        pytest.skip("runs the real benchmark on a GPU")
    assert "no CUDA device" in _run(str(ROOT / "benchmarks" / "bench_wgrad_sample_norm.py"))


def test_gpu_suite_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_batch_growth_benchmark_quick(tmp_path):
    """bench_batch_growth.py --quick: the whole grid on a tiny model (fixed batches, a
    Megatron ramp, gns, goodput), the analysis, summary.json and the plots (< 60 s)."""
    import json

    text = _run(str(ROOT / "benchmarks" / "bench_batch_growth.py"), "--quick", "--jobs", "1",
                "--out-dir", str(tmp_path), timeout=240)
    summary = json.loads((tmp_path / "summary.json").read_text())
    cosine = summary["cosine"]
    assert len(cosine["targets"]) == 4 and "gns" in cosine["rules"]
    assert {"fixed-4-lr1", "fixed-8-lr1", "fixed-16-lr1", "ramp-0.5", "goodput"} <= set(
        cosine["rules"])
    assert "gns_saves_25pct_every_target" in cosine["verdict"]
    assert (tmp_path / "plots_cosine.png").stat().st_size > 0 and "| run |" in text
    # every run evaluated the same validation samples at the same marks (+- one batch)
    assert all(r["final_valid"] is not None for r in summary["runs"])
