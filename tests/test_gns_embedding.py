"""GNS with --gns-include-embedding: word embedding + output layer, tied and untied.

Runs tests/dist/gns_worker.py (through tests/gns_helpers.py) and compares the tracker's
per-sample |g_i|^2 and |G_B|^2 with a brute-force loop over single samples.
"""
import math

import pytest

from gns_helpers import assert_close, run_worker


@pytest.fixture(scope="module")
def tied_tp1(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("gns_emb"), 1, "--include-embedding", "--tie")


def test_tied_embedding_tp1_matches_brute_force(tied_tp1):
    # |E_i + O_i|^2 including the cross term 2<E_i, O_i> of the shared weight
    assert_close(tied_tp1["per_sample_gns"], tied_tp1["per_sample_brute"])
    assert_close(tied_tp1["batch_gns"], tied_tp1["batch_brute"])
    assert tied_tp1["b_simple"] is not None and math.isfinite(tied_tp1["b_simple"])


def test_tied_embedding_tp2_sequence_parallel(tied_tp1, tmp_path):
    r = run_worker(tmp_path, 2, "--tp", "2", "--include-embedding", "--tie")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["per_sample_gns"], tied_tp1["per_sample_brute"])  # same full weights
    assert_close(r["batch_gns"], tied_tp1["batch_brute"])


def test_untied_embedding_pp2(tmp_path):
    r = run_worker(tmp_path, 2, "--pp", "2", "--include-embedding")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["batch_gns"], r["batch_brute"])


def test_tied_embedding_tp2_without_sequence_parallel(tied_tp1, tmp_path):
    # TP without SP: dgrad all-reduce path; norm/row-bias params duplicated on TP ranks
    r = run_worker(tmp_path, 2, "--tp", "2", "--no-sp", "--include-embedding", "--tie")
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["per_sample_gns"], tied_tp1["per_sample_brute"])
    assert_close(r["batch_gns"], tied_tp1["batch_brute"])
