"""GNS under Megatron's calculate_per_token_loss (token-sum loss, loss mask, finalize / N).

The per-sample gradient is h_i = (B / N) * (token-sum gradient of sample i), whose mean is
exactly the reduced batch gradient; the worker's brute force builds h_i from single-sample
runs (see tests/dist/gns_worker.py) and the tracker must agree under TP+SP and DP.
"""
import math

import pytest

from gns_helpers import assert_close, run_worker


@pytest.fixture(scope="module")
def pt1(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("gns_pt"), 1, "--per-token-loss")


def test_per_token_loss_tp1_matches_brute_force(pt1):
    assert_close(pt1["per_sample_gns"], pt1["per_sample_brute"])
    assert_close(pt1["batch_gns"], pt1["batch_brute"])
    assert pt1["b_simple"] is not None and math.isfinite(pt1["b_simple"])


def test_per_token_loss_tp2_sequence_parallel(pt1, tmp_path):
    r = run_worker(tmp_path, 2, "--tp", "2", "--per-token-loss")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["per_sample_gns"], pt1["per_sample_brute"])
    assert_close(r["batch_gns"], pt1["batch_brute"])


def test_per_token_loss_data_parallel_estimator(pt1, tmp_path):
    d = run_worker(tmp_path, 2, "--micro-batches", "1", "--per-token-loss",
                   "--estimator", "data-parallel")
    assert_close(d["small_gns"], pt1["half_brute"])
    assert_close(d["batch_gns"], pt1["batch_brute"])
