"""Dynamic global batch inside the real training loop (CPU, gloo, 2 ranks).

Checks that the batch grows on the ramp's schedule, that the LR follows the token-based
schedule times the sqrt scaling factor, and that a run resumed mid-growth reproduces the
uninterrupted run's batch sequence, LR, sample order and losses.
"""

import math

import pytest

from launch import logged_steps

GROWTH = ["--batch-growth", "ramp", "--rampup-batch-size", "4", "4", "24",
          "--batch-growth-max", "12", "--lr-scaling", "sqrt",
          "--topology", "nodes=1,gpus_per_node=2,gpu=a100-80gb",
          "--lr-decay-style", "linear", "--lr-decay-samples", "400", "--train-iters", "10"]


def _run(tmp_path, name, extra):
    return logged_steps(2, [*GROWTH, *extra], tmp_path, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("growth"), "full", [])


def test_ramp_grows_batch_and_scales_lr(uninterrupted):
    batches = [uninterrupted[i]["global_batch_size"] for i in sorted(uninterrupted)]
    assert batches[0] == 4 and batches[-1] == 12
    assert batches == sorted(batches), "the global batch must never shrink"
    consumed = 0
    for i in sorted(uninterrupted):
        m = uninterrupted[i]
        tokens_before = consumed * 32
        expected = 1e-3 * (1 - tokens_before / (400 * 32)) * math.sqrt(m["global_batch_size"] / 4)
        assert m["lr"] == pytest.approx(expected, rel=1e-6)
        consumed += m["global_batch_size"]
        assert m["consumed_samples"] == consumed


def test_resume_mid_growth_is_exact(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    first = _run(tmp_path, "first", ["--save", str(ckpt), "--exit-interval", "5"])
    second = _run(tmp_path, "second", ["--load", str(ckpt)])
    resumed = {**first, **second}
    assert sorted(resumed) == sorted(uninterrupted)
    for i in uninterrupted:
        for key in ("global_batch_size", "lr", "consumed_samples"):
            assert resumed[i][key] == uninterrupted[i][key], (i, key)
        assert resumed[i]["lm_loss"] == pytest.approx(uninterrupted[i]["lm_loss"], rel=1e-6)
