"""GNS and GNS-driven batch growth inside the real training loop (CPU, gloo, 2 ranks)."""

import math

import pytest

from launch import TINY, read_metrics, run_pretrain

TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--global-batch-size", "8"]


def _run(tmp_path, name, extra, iters=6):
    out = tmp_path / f"{name}.jsonl"
    proc = run_pretrain(2, [*TINY, *TP2, "--train-iters", str(iters), "--data-cache-path",
                            str(tmp_path / "dc"), "--log-json", str(out), *extra], tmp_path)
    rows = read_metrics(out)
    return {m["iteration"]: m for m in rows if "lm_loss" in m}, rows, proc.stdout


def test_gns_does_not_change_training_and_logs_b_simple(tmp_path):
    off, _, _ = _run(tmp_path, "off", [])
    on, rows, stdout = _run(tmp_path, "on", ["--gns", "--gns-log-interval", "2",
                                             "--gns-plot", str(tmp_path / "gns.png")])
    for i in off:
        assert on[i]["lm_loss"] == pytest.approx(off[i]["lm_loss"], rel=1e-6)
        assert on[i]["grad_norm"] == pytest.approx(off[i]["grad_norm"], rel=1e-5)
        assert math.isfinite(on[i]["b_simple"]) and on[i]["b_simple"] > 0
    gns_rows = [r for r in rows if "gns/b_simple" in r]
    assert [r["iteration"] for r in gns_rows] == [2, 4, 6]
    assert gns_rows[-1]["gns/tokens"] == 6 * 8 * 32
    assert stdout.count(" gns iteration") == 3
    assert (tmp_path / "gns.png").stat().st_size > 0


def test_gns_measure_interval_measures_every_nth_step(tmp_path):
    off, _, _ = _run(tmp_path, "off", [])
    on, rows, stdout = _run(tmp_path, "every2", ["--gns", "--gns-measure-interval", "2"])
    for i in off:  # measuring or not, training is the same
        assert on[i]["lm_loss"] == pytest.approx(off[i]["lm_loss"], rel=1e-6)
    gns = {r["iteration"]: r for r in rows if "gns/b_simple" in r}
    assert sorted(gns) == [2, 3, 4, 5, 6]  # nothing measured before step 2
    for measured in (2, 4):  # unmeasured steps report the last measurement
        assert gns[measured + 1]["gns/b_simple_raw"] == gns[measured]["gns/b_simple_raw"]
    assert gns[4]["gns/b_simple_raw"] != gns[2]["gns/b_simple_raw"]
    assert gns[6]["gns/tokens"] == 6 * 8 * 32  # unmeasured steps' tokens still count
    assert "every 2 steps" in stdout


GROWTH = ["--gns", "--batch-growth", "gns", "--batch-growth-k", "100", "--batch-growth-max", "16",
          "--batch-growth-interval", "2", "--batch-growth-min-steps", "2",
          "--topology", "nodes=1,gpus_per_node=2,gpu=a100-80gb", "--lr-scaling", "linear"]


def test_gns_batch_growth_resumes_exactly(tmp_path):
    full, _, _ = _run(tmp_path, "full", GROWTH, iters=8)
    batches = [full[i]["global_batch_size"] for i in sorted(full)]
    assert batches[0] == 8 and batches[-1] == 16, batches
    ckpt = tmp_path / "ckpt"
    first, _, _ = _run(tmp_path, "first", [*GROWTH, "--save", str(ckpt), "--exit-interval", "3"],
                       iters=8)
    second, _, _ = _run(tmp_path, "second", [*GROWTH, "--load", str(ckpt)], iters=8)
    resumed = {**first, **second}
    assert sorted(resumed) == sorted(full)
    for i in full:
        for key in ("global_batch_size", "lr", "consumed_samples"):
            assert resumed[i][key] == full[i][key], (i, key)
        for key in ("lm_loss", "b_simple"):
            assert resumed[i][key] == pytest.approx(full[i][key], rel=1e-5), (i, key)


def test_data_parallel_estimator_runs_in_training(tmp_path):
    """McCandlish's two-batch estimator from per-rank vs global gradient norms (DP=2)."""
    out = tmp_path / "dp.jsonl"
    run_pretrain(2, [*TINY, "--global-batch-size", "8", "--train-iters", "6", "--gns",
                     "--gns-estimator", "data-parallel", "--data-cache-path", str(tmp_path / "dc"),
                     "--log-json", str(out)], tmp_path)
    rows = [m for m in read_metrics(out) if "lm_loss" in m]
    assert len(rows) == 6
    assert all(math.isfinite(m["gns_grad_sq_norm"]) for m in rows)
    assert any(math.isfinite(m["b_simple"]) and m["b_simple"] > 0 for m in rows)
