"""GNS tracker on a tiny megatron-core GPT (CPU, gloo): exact per-sample and batch norms.

Each case runs tests/dist/gns_worker.py under torchrun and compares the tracker's
|g_i|^2 and |G_B|^2 with a brute-force loop over single samples (one Megatron
forward/backward per sample) and/or with the TP=1 run on identical weights and data.
"""
import math

import pytest

from gns_helpers import assert_close, run_worker


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """TP=1, one process, M=2 micro-batches of 2 samples (4 samples)."""
    return run_worker(tmp_path_factory.mktemp("gns"), 1)


def test_tp1_grad_accumulation_matches_brute_force(tp1):
    assert_close(tp1["per_sample_gns"], tp1["per_sample_brute"])
    assert_close(tp1["batch_gns"], tp1["batch_brute"])
    # The estimator end to end: finite B_simple, history and state round trip.
    assert tp1["b_simple"] is not None and math.isfinite(tp1["b_simple"]) and tp1["b_simple"] > 0
    assert tp1["history_len"] == 4 and tp1["state_roundtrip"]
    first = tp1["first"]
    mean_sq = sum(tp1["per_sample_brute"]) / 4
    expected_trace = 4 / 3 * (mean_sq - tp1["batch_brute"])
    assert math.isclose(first["trace_sigma"], expected_trace, rel_tol=1e-4)


def test_tp2_sequence_parallel_recompute(tp1, tmp_path):
    r = run_worker(tmp_path, 2, "--tp", "2", "--recompute")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["batch_gns"], r["batch_brute"])
    # Same full weights as TP=1 (CPU init splits one master weight): same numbers.
    assert_close(r["per_sample_gns"], tp1["per_sample_brute"])
    assert_close(r["batch_gns"], tp1["batch_brute"])
    assert r["b_simple"] is not None and math.isfinite(r["b_simple"])


def test_pp2_recompute_rmsnorm(tmp_path):
    r = run_worker(tmp_path, 2, "--pp", "2", "--recompute", "--normalization", "RMSNorm")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["batch_gns"], r["batch_brute"])
    # 4 samples is a very noisy |G|^2 estimate (can be <= 0, B_simple then None); the
    # measurement itself must be finite.
    assert math.isfinite(r["last"]["trace_sigma"]) and math.isfinite(r["last"]["grad_sq_norm"])


def test_dp2_per_sample_and_data_parallel_estimators(tp1, tmp_path):
    # DP=2 with 1 micro-batch of 2 samples per rank: the same 4 samples as the TP=1 run.
    r = run_worker(tmp_path, 2, "--micro-batches", "1")
    assert_close(r["per_sample_gns"], tp1["per_sample_brute"])
    assert_close(r["batch_gns"], tp1["batch_brute"])
    d = run_worker(tmp_path, 2, "--micro-batches", "1", "--estimator", "data-parallel")
    # small batch = one DP rank's 2 samples = each half of the TP=1 batch
    assert_close(d["small_gns"], tp1["half_brute"])
    assert_close(d["batch_gns"], tp1["batch_brute"])
    assert d["b_simple"] is not None and math.isfinite(d["b_simple"])


def test_dp2_distributed_optimizer_batch_norm(tp1, tmp_path):
    # finalize reduce-scatters the grads: |G_B|^2 is summed over the DP ranks' shards
    r = run_worker(tmp_path, 2, "--micro-batches", "1", "--dist-opt")
    assert_close(r["per_sample_gns"], tp1["per_sample_brute"])
    assert_close(r["batch_gns"], tp1["batch_brute"])
