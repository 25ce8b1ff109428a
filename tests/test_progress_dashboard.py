"""What a user sees of a growing batch: the progress line in samples with an ETA, GNS lines
at --log-interval, the growth dashboard (--gns-plot) and tools/plot_runs.py. No processes."""
import importlib.util
import json
from pathlib import Path

import pytest

from megatron_ext.gns.plot import growth_events, plot_dashboard
from megatron_ext.training.job import parse_job
from megatron_ext.training.logging_config import LoggingConfig
from megatron_ext.training.metrics import MetricsLogger, format_eta

REPO = Path(__file__).resolve().parents[1]


def _metrics(consumed, batch, ms=500.0):
    return {"consumed_samples": consumed, "tokens": consumed * 128, "iteration_time_ms": ms,
            "lr": 1e-4, "global_batch_size": batch, "lm_loss": 2.5, "grad_norm": 0.5,
            "tokens_per_s": 1.0, "tflops_per_gpu": 0.0, "memory_gib": 0.1}


def test_progress_counts_samples_with_an_eta_when_the_batch_grows(capsys):
    log = MetricsLogger(True, LoggingConfig())
    log.sample_budget = 6000
    log.iteration(640, 1500, _metrics(5920, 64))  # 64 samples / 0.5 s = 128 samples/s
    line = capsys.readouterr().out
    assert line.startswith(" samples     5920/6000 (98.7%) | ETA 0:00:01 at 128.0 samples/s "
                           "(<= 2 steps of batch 64) | iteration      640 |"), line
    assert "1500" not in line  # the iteration bound of the initial batch is not shown
    assert log.history[-1]["consumed_samples"] == 5920
    log.iteration(641, 1500, _metrics(5984, 64, ms=250.0))  # (.1*256 + .09*128) / .19
    assert "at 195.4 samples/s" in capsys.readouterr().out
    log.iteration(642, 1500, _metrics(6000, 16, ms=250.0))  # a new batch: a new average
    assert "ETA 0:00:00 at 64.0 samples/s (<= 0 steps of batch 16)" in capsys.readouterr().out


def test_fixed_batch_keeps_the_iteration_progress(capsys):
    log = MetricsLogger(True, LoggingConfig())
    log.iteration(3, 40, _metrics(12, 4))
    assert capsys.readouterr().out.startswith(" iteration        3/      40 | consumed samples:")


def test_dashboard_history_skips_a_line_a_crash_cut_short(tmp_path, capsys):
    """An earlier attempt killed mid-write leaves half a JSON line in an appended --log-json:
    the dashboard's history skips it rather than ending the run with a stack trace."""
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps({"iteration": 1, **_metrics(4, 4)}) + "\n" + '{"iteration": 2, "lm_lo')
    log = MetricsLogger(True, LoggingConfig(log_json=str(path)))
    with path.open("a") as f:  # the next attempt's lines start on a line of their own
        f.write("\n")
    log.iteration(3, 40, _metrics(12, 4))
    assert [r["iteration"] for r in log.step_history()] == [1, 3]


def test_format_eta():
    assert (format_eta(3725.4), format_eta(float("inf"))) == ("1:02:05", "?")


@pytest.mark.parametrize("argv, expected", [(["--log-interval", "10"], 10),
                                            (["--log-interval", "10", "--gns-log-interval",
                                              "3"], 3),
                                            ([], 1)])
def test_gns_lines_follow_log_interval_unless_told(argv, expected):
    job = parse_job(["--gns", *argv], world_size=2)
    assert job.gns.gns_log_interval == expected


def _synthetic_run():
    gns, steps, batch = [], [], 4
    for it in range(1, 61):
        tokens = it * 4096
        gns.append({"tokens": tokens, "b_simple": 2.0 + it, "b_simple_raw": 2.0 + it * 1.3})
        if it in (20, 40):
            batch *= 2
        steps.append({"iteration": it, "tokens": tokens, "global_batch_size": batch,
                      "lr": 1e-3 * (1 - it / 70), "lm_loss": 5.0 - it / 30,
                      "consumed_samples": it * 8, "b_simple": 2.0 + it})
    return gns, steps


def test_dashboard_is_written_with_growth_events(tmp_path):
    gns, steps = _synthetic_run()
    assert [(e["iteration"], e["old"], e["new"]) for e in growth_events(steps)] == \
        [(19, 4, 8), (39, 8, 16)]
    out = tmp_path / "dash.png"
    assert plot_dashboard(gns, steps, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_plot_runs_overlays_two_logs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "tools" / "plot_runs.py")
    plot_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_runs)
    _, steps = _synthetic_run()
    logs = []
    for name, scale in (("fixed", 1.0), ("growth", 0.9)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for s in steps:
                row = {k: v for k, v in s.items() if k != "b_simple"}
                f.write(json.dumps({**row, "lm_loss": s["lm_loss"] * scale}) + "\n")
                f.write(json.dumps({"iteration": s["iteration"],
                                    "gns/b_simple": s["b_simple"]}) + "\n")
        logs.append(str(path))
    assert plot_runs.read_run(logs[0])[5]["b_simple"] == steps[5]["b_simple"]
    out = tmp_path / "runs.png"
    assert plot_runs.main([*logs, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "fixed: 60 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plot_runs.main([logs[0], str(tmp_path / "missing.jsonl")])
