"""benchmarks/gpu_run.py, the one-call GPU script: its envelope rule and stage plan, the rows
it reads from stage output, and a whole --cpu-smoke run (every stage at tiny sizes on CPU;
this also covers the GNS-overhead and long-context benchmarks' --cpu-smoke modes)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_run  # noqa: E402

STAGES = ["env", "kernel_smoke", "kernel_table", "gns_overhead", "pretrain", "long_context",
          "gpu_tests"]


def test_envelope_rule_skips_a_stage_whose_budget_does_not_fit():
    assert gpu_run.fits(150, 151) and not gpu_run.fits(150, 149)
    assert gpu_run.fits(60, 20, last=True) and not gpu_run.fits(60, 10, last=True)


@pytest.mark.parametrize("smoke", [False, True])
def test_stage_plan_is_in_order_of_decisiveness_and_fits_the_envelope(smoke, tmp_path):
    args = SimpleNamespace(cpu_smoke=smoke, work_dir=str(tmp_path))
    stages = gpu_run.plan_stages(args, cuda=not smoke)
    assert ["env"] + [s.name for s in stages] == STAGES
    assert stages[-1].last and [s.name for s in stages if s.needs_cuda] == ["kernel_table",
                                                                            "gpu_tests"]
    if not smoke:  # GPU budgets: all but the last stage fit in the 570 s default with room
        assert sum(s.budget_s for s in stages[:-1]) <= 570 - 30
        long = next(s for s in stages if s.name == "long_context").argv
        assert "--memory-cap-gb" in long and "4096,16384,65536" in long


def test_rows_are_read_from_json_lines_pretrain_logs_and_pytest_summaries():
    row = gpu_run.rows_from_line("x", json.dumps({"stage": "kernel_table", "b": 8}))
    assert row == [{"stage": "kernel_table", "b": 8}]
    assert gpu_run.rows_from_line("x", '{"no_stage": 1}') == []
    line = (" iteration        4/      12 | consumed samples:           32 | elapsed time per "
            "iteration (ms): 812.5 | learning rate: 3.0E-04 | global batch size:     8 | lm loss:"
            " 1.042E+01 | grad norm: 3.1 | tokens/s: 40331 | TFLOP/s/GPU: 312.40 | mem: 21.5 GiB"
            " | ms: data 1.0")
    (r,) = gpu_run.rows_from_line("pretrain", line)
    assert (r["iteration"], r["ms_per_iteration"], r["tokens_per_s"], r["mem_gib"]) == \
        (4, 812.5, 40331, 21.5)
    (t,) = gpu_run.rows_from_line("gpu_tests", "3 failed, 41 passed, 2 skipped in 80.1s")
    assert (t["failed"], t["passed"], t["skipped"]) == (3, 41, 2)


def test_wheels_are_found_in_named_folders_and_a_missing_path_is_one_error(tmp_path):
    (tmp_path / "megatron_core-0.16.1-py3-none-any.whl").write_bytes(b"")
    assert [Path(w).name for w in gpu_run.find_wheels([str(tmp_path)])] == \
        ["megatron_core-0.16.1-py3-none-any.whl"]
    with pytest.raises(SystemExit, match="no such wheel"):
        gpu_run.find_wheels([str(tmp_path / "nope")])


def test_kernels_are_linked_where_megatron_ext_is_not_installed(tmp_path, monkeypatch):
    (tmp_path / "megatron_ext").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    monkeypatch.setattr(gpu_run, "ROOT", tmp_path)
    link = gpu_run.link_kernels()
    assert (link / "__init__.py").exists() and gpu_run.link_kernels() == link  # idempotent


def test_cpu_smoke_runs_every_stage_and_writes_few_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--cpu-smoke",
                        "--out", str(out), "--work-dir", str(tmp_path / "work"),
                        "--budget-s", "900", "--timeout-scale", "5"],  # a busy CI box
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "rows.jsonl", "run.log",
                                                     "summary.json"]
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["kernels_from"].endswith(os.path.join("kernels", "__init__.py")), env_info
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    ends = {r["stage"]: r["status"] for r in rows if r.get("event") == "stage_end"}
    assert list(ends) == STAGES, ends
    assert ends["kernel_table"] == ends["gpu_tests"] == "skipped: no CUDA"
    assert all(ends[s] == "ok" for s in STAGES if s not in ("kernel_table", "gpu_tests")), ends
    measured = [r for r in rows if "event" not in r]
    by_stage = {s: [r for r in measured if r["stage"] == s] for s in STAGES}
    assert by_stage["kernel_smoke"][0]["accuracy_ok"] and by_stage["kernel_smoke"][0]["route"]
    assert [r["measure_interval"] for r in by_stage["gns_overhead"]] == [1, 2]
    assert len(by_stage["pretrain"]) == 3 and by_stage["pretrain"][-1]["tokens_per_s"] > 0
    assert [r["recompute"] for r in by_stage["long_context"]] == ["none", "full"]
    assert all(r["status"] == "ok" and r["micro_batches"] >= 1 for r in by_stage["long_context"])
    assert "| recompute | seq |" in log and "planner (GiB)" in log and "on/off =" in log
    print(f"gpu_run --cpu-smoke: {took:.0f} s wall")
