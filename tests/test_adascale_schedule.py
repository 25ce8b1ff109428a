"""AdaScale's schedule clock (Johnson et al. 2020, Algorithm 1): under ``--lr-scaling
adascale`` a step at gain r moves the LR schedule and the --train-samples budget by r initial
batches, not by its size; every other rule keeps the clock on the consumed samples.

Unit checks of the clock's owner (TrainState), the component and the progress line, then a
1-rank training run (ramp 4 -> 12, --gns) whose LR must be r x the cosine schedule read at the
clock, which must stop at the budget, and whose resume must be exact.
"""

import math

import pytest

from launch import logged_steps
from megatron_ext.batch_growth.component import BatchGrowthComponent
from megatron_ext.batch_growth.config import BatchGrowthConfig
from megatron_ext.training.metrics import steps_left
from megatron_ext.training.state import TrainState


def test_state_clock_follows_samples_unless_told():
    s = TrainState(32, 8, 8, 1)
    s.advance()
    s.advance(schedule_increment=5.5)
    assert (s.consumed_samples, s.schedule_samples) == (16, 13.5)
    again = TrainState(32, 8, 8, 1)
    again.load_state_dict(s.state_dict())
    assert again.schedule_samples == 13.5
    old = s.state_dict()
    del old["schedule_samples"]  # a checkpoint from before the clock
    again.load_state_dict(old)
    assert again.schedule_samples == 16


@pytest.mark.parametrize("rule,expected", [("adascale", 2.5 * 8), ("sqrt", None)])
def test_component_moves_clock_by_gain(rule, expected):
    cfg = BatchGrowthConfig(batch_growth="ramp", batch_growth_max=32, lr_scaling=rule,
                            rampup_batch_size=[8, 8, 64])
    comp = BatchGrowthComponent(cfg, 8, None, lambda: 20.0, log=None)
    assert comp.schedule_increment(2.5) == expected
    state = TrainState(32, 16, 8, 1, schedule_samples=40.0)
    assert ("schedule_samples" in comp.metrics(state)) == (rule == "adascale")


def test_progress_counts_on_the_clock():
    m = {"consumed_samples": 96, "global_batch_size": 32, "schedule_samples": 64.0,
         "schedule_step_samples": 16.0}
    assert steps_left(128, m) == 4       # (128 - 64) / 16, not (128 - 96) / 32 = 1
    assert steps_left(128, {"consumed_samples": 96, "global_batch_size": 32}) == 1


GROWTH = ["--batch-growth", "ramp", "--rampup-batch-size", "4", "4", "24",
          "--batch-growth-max", "12", "--lr-scaling", "adascale", "--gns",
          "--lr-decay-style", "cosine", "--lr-warmup-samples", "0", "--train-samples", "64"]


def _run(tmp_path, name, extra):
    return logged_steps(1, [*GROWTH, *extra], tmp_path, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("adascale"), "full", [])


def test_adascale_lr_reads_schedule_at_clock(uninterrupted):
    clock = 0.0
    for i in sorted(uninterrupted):
        m = uninterrupted[i]
        r, b = m["adascale_gain"], m["global_batch_size"]
        assert 1.0 - 1e-9 <= r <= b / 4 + 1e-9
        cosine = 1e-3 * 0.5 * (1 + math.cos(math.pi * clock / 64))  # --min-lr 0
        assert m["lr"] == pytest.approx(r * cosine, rel=1e-6, abs=1e-12)
        clock += r * 4
        assert m["schedule_samples"] == pytest.approx(clock)
    last = uninterrupted[max(uninterrupted)]
    assert last["schedule_samples"] >= 64 > last["schedule_samples"] - 4 * last["adascale_gain"]
    assert last["consumed_samples"] > last["schedule_samples"], "grown batches read more samples"


def test_adascale_resume_is_exact(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    first = _run(tmp_path, "first", ["--save", str(ckpt), "--exit-interval", "5"])
    second = _run(tmp_path, "second", ["--load", str(ckpt)])
    resumed = {**first, **second}
    assert sorted(resumed) == sorted(uninterrupted)
    for i in uninterrupted:
        for key in ("global_batch_size", "lr", "consumed_samples", "schedule_samples"):
            assert resumed[i][key] == pytest.approx(uninterrupted[i][key], rel=1e-9), (i, key)
        assert resumed[i]["lm_loss"] == pytest.approx(uninterrupted[i]["lm_loss"], rel=1e-6)


