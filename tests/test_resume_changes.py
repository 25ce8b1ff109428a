"""Resuming with another plan, as long-context users do: more iterations, a new global batch,
a longer --seq-length, another seed, another TP size. Megatron-LM's rule for the LR schedule
(the checkpoint's wins unless --override-opt-param-scheduler), data phases for the sample
stream, and one line in the log for every value that changed."""

import pytest

from launch import TINY, losses, read_metrics, run_pretrain

COSINE = ["--lr-decay-style", "cosine"]  # (TINY's constant LR would hide schedule changes)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _train(tmp_path, data_cache, args, nproc=2, check=True):
    return run_pretrain(nproc, [*TINY, "--data-cache-path", str(data_cache), *args], tmp_path,
                        check=check)


def _saved_after_4(tmp_path, data_cache, extra=()):
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, data_cache, ["--train-iters", "4", "--save", str(ckpt), *extra])
    return ckpt


def _lrs(path):
    return {r["iteration"]: r["lr"] for r in read_metrics(path) if "lr" in r}


def test_more_iterations_continue_the_checkpoints_schedule_and_data(tmp_path, data_cache):
    ckpt = _saved_after_4(tmp_path, data_cache, COSINE)
    out = tmp_path / "more.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "8", "--load", str(ckpt),
                                         "--log-json", str(out), *COSINE])
    assert "--lr-decay-samples 32 differs from the checkpoint's 16: continuing the " \
           "checkpoint's schedule" in proc.stdout
    assert all(lr == 0.0 for lr in _lrs(out).values())  # the old decay had ended at sample 16
    over = tmp_path / "override.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "8", "--load", str(ckpt),
                                         "--log-json", str(over), "--override-opt-param-scheduler",
                                         *COSINE])
    assert "--lr-decay-samples 32 replaces the checkpoint's 16" in proc.stdout
    reference = tmp_path / "reference.jsonl"
    _train(tmp_path, data_cache, ["--train-iters", "8", "--log-json", str(reference), *COSINE])
    assert _lrs(over) == {i: lr for i, lr in _lrs(reference).items() if i > 4}
    # same data phase: the samples of steps 5-8 are the ones an 8-step run reads (the
    # weights differ, as the first 4 steps ran another schedule: compare the data instead)
    assert "data phase" not in proc.stdout


def test_new_global_batch_and_longer_sequences_start_where_the_checkpoint_stopped(tmp_path, data_cache):
    ckpt = _saved_after_4(tmp_path, data_cache)
    out = tmp_path / "longer.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "6", "--load", str(ckpt),
                                         "--global-batch-size", "8", "--seq-length", "64",
                                         "--log-json", str(out)])
    assert "resuming with global batch 8 (the checkpoint ran 4)" in proc.stdout
    assert "data phase 2 from sample 16: --seq-length 32 -> 64" in proc.stdout
    rows = {r["iteration"]: r for r in read_metrics(out) if "lm_loss" in r}
    assert sorted(rows) == [5, 6]
    assert [rows[i]["consumed_samples"] for i in (5, 6)] == [24, 32]
    assert rows[6]["tokens"] == 16 * 32 + 16 * 64  # tokens counted per phase's length


def test_another_seed_needs_permission(tmp_path, data_cache):
    ckpt = _saved_after_4(tmp_path, data_cache)
    proc = _train(tmp_path, data_cache, ["--train-iters", "6", "--load", str(ckpt), "--seed", "8"],
                  check=False)
    errors = [l for l in proc.stderr.splitlines() if "pretrain_gpt.py: error:" in l]
    assert proc.returncode != 0 and len(errors) == 1 and "--allow-seed-change" in errors[0]
    proc = _train(tmp_path, data_cache, ["--train-iters", "6", "--load", str(ckpt), "--seed", "8",
                                         "--allow-seed-change"])
    assert "data phase 2 from sample 16: --seed 7 -> 8" in proc.stdout


def test_tp1_checkpoint_resumes_under_tp2_keeping_its_padded_vocabulary(tmp_path, data_cache):
    vocab128 = ["--make-vocab-size-divisible-by", "128"]  # TP 1 pads 257 to 384, TP 2 to 512
    ckpt = _saved_after_4(tmp_path, data_cache, vocab128)
    reference = tmp_path / "reference.jsonl"
    _train(tmp_path, data_cache, ["--train-iters", "6", *vocab128, "--log-json", str(reference)])
    out = tmp_path / "tp2.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "6", "--load", str(ckpt), *vocab128,
                                         "--tensor-model-parallel-size", "2",
                                         "--sequence-parallel", "--global-batch-size", "4",
                                         "--log-json", str(out)])
    assert "keeping the checkpoint's padded vocabulary 384" in proc.stdout
    got, want = losses(out), losses(reference)
    assert sorted(got) == [5, 6]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=2e-5)


def test_extending_a_constant_lr_run_is_exact(tmp_path, data_cache):
    """Same data phase: steps 5-8 of a 4-step run resumed with --train-iters 8 read the
    samples, and get the losses, of an uninterrupted 8-step run."""
    ckpt = _saved_after_4(tmp_path, data_cache)
    out, reference = tmp_path / "more.jsonl", tmp_path / "reference.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "8", "--load", str(ckpt),
                                         "--log-json", str(out)])
    assert "data phase" not in proc.stdout and "differs from the checkpoint" not in proc.stdout
    _train(tmp_path, data_cache, ["--train-iters", "8", "--log-json", str(reference)])
    got, want = losses(out), losses(reference)
    assert sorted(got) == [5, 6, 7, 8]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-6)
