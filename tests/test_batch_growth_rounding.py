"""Tests of batch_growth.rounding (the grid of batches a growing run may pick), its use by the
controller, and the LR-aware gns target."""
import pytest

from megatron_ext.batch_growth import BatchController, BatchGrowthConfig, Progress
from megatron_ext.batch_growth.rounding import BatchGrid, snap_for_layout


def cfg(**kw):
    base = dict(batch_growth="gns", batch_growth_max=1024, batch_growth_interval=1,
                batch_growth_min_steps=0, batch_growth_threshold=1.0)
    base.update(kw)
    return BatchGrowthConfig(**base)


def test_efficient_grid_is_powers_of_two_and_three_times():
    g = BatchGrid(1)
    assert g.batches(1, 64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert BatchGrid(8).batches(8, 200) == [8, 16, 24, 32, 48, 64, 96, 128, 192]
    assert not any(g.contains(b) for b in (5, 7, 11, 13, 17, 40))
    assert BatchGrid(4, "any").batches(5, 20) == [8, 12, 16, 20]
    assert g.round_down(63.9, 8) == 48 and g.round_down(11, 8) is None
    with pytest.raises(ValueError, match="batch-growth-rounding"):
        BatchGrid(1, "odd")


def test_grid_sizes_stay_valid_when_dp_halves_or_doubles():
    # quantum 8 (e.g. micro 1 x dp 8): every size splits over dp 4 and 8, from 4 quanta
    # on also over dp 16 (any integer multiple would not: 40, 56, 72, ...)
    for b in BatchGrid(8).batches(8, 4096):
        assert all(b % dp == 0 for dp in (4, 8)) and (b < 32 or b % 16 == 0), b


def test_controller_never_picks_a_prime_batch():
    ctl = BatchController(cfg(), 8, granularity=1)
    picks, batch = [], 8
    for it, bs in enumerate([11, 13, 17, 29, 37, 61, 100], start=1):
        new = ctl.step(Progress(it, it * batch, 0, batch), float(bs))
        if new:
            picks.append(new)
            batch = new
    assert picks == [12, 16, 24, 32, 48, 96]   # k*B_simple rounded down onto the grid
    assert cfg(batch_growth_rounding="any").batch_growth_rounding == "any"


def test_ramp_keeps_megatrons_sizes():
    c = BatchGrowthConfig(batch_growth="ramp", batch_growth_max=40, rampup_batch_size=[8, 8, 320])
    ramp = lambda samples: min(40, 8 + 8 * (samples // 80))  # noqa: E731 (Megatron's 8 8 320)
    ctl, batch, seen = BatchController(c, 8, granularity=1, ramp=ramp), 8, []
    for it in range(1, 200):
        new = ctl.step(Progress(it, it * 8, 0, batch))
        if new:
            seen.append(new)
            batch = new
    assert seen == [16, 24, 32, 40]             # 40 is not on the efficient grid: kept


def test_lr_aware_target_scales_with_the_schedule():
    plain = BatchController(cfg(), 8, granularity=1)
    aware = BatchController(cfg(batch_growth_lr_aware=True), 8, granularity=1)
    assert plain.step(Progress(1, 8, 0, 8, lr_fraction=0.25), 128.0) == 128
    assert aware.step(Progress(1, 8, 0, 8, lr_fraction=0.25), 128.0) == 32   # 128 * 0.25
    assert aware.step(Progress(2, 40, 0, 32, lr_fraction=0.1), 128.0) is None  # no chase
    assert "lr_aware" in BatchGrowthConfig.__dataclass_fields__["batch_growth_lr_aware"].name


def test_snap_for_layout_grows_to_the_next_split():
    assert snap_for_layout(7, 1, 2) == 8        # issue 13: batch 7 resumed on DP=2
    assert snap_for_layout(48, 4, 8) == 64
    assert snap_for_layout(64, 4, 8) == 64


def test_resume_batch_on_a_new_data_parallel_size():
    from megatron_ext.batch_growth.rounding import resume_batch

    saved = dict(iteration=40, consumed_samples=300, global_batch_size=7, micro_batch_size=7)
    same, note = resume_batch(saved, 8, 1)
    assert same == saved and note is None                    # still splits: unchanged
    snapped, note = resume_batch(saved, 1, 2)                # issue 13: DP=1 -> DP=2
    assert snapped["global_batch_size"] == 8 and snapped["micro_batch_size"] == 1
    assert note.count("\n") == 0 and "7" in note and "8" in note
    # the checkpoint's micro-batch does not fit the new layout but the flags' does
    other, note = resume_batch(dict(saved, global_batch_size=48, micro_batch_size=12), 2, 8)
    assert other["global_batch_size"] == 48 and other["micro_batch_size"] == 2 and note is None
