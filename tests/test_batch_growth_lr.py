"""Tests of megatron_ext.batch_growth.lr_scaling and the config/flags."""
import argparse

import pytest

from megatron_ext.batch_growth import (BatchGrowthConfig, LRScaler,
                                       adascale_gain, add_batch_growth_args, lr_scale_factor,
                                       pollux_efficiency)


def test_scale_factors():
    assert lr_scale_factor("none", 1024, 256) == 1.0
    assert lr_scale_factor("linear", 1024, 256) == 4.0
    assert lr_scale_factor("sqrt", 1024, 256) == 2.0
    # r = (sigma^2 + |G|^2) / (sigma^2/S + |G|^2), sigma^2/|G|^2 = B_simple/B0
    bs, b0, b = 1000.0, 256, 1024
    ratio = bs / b0
    assert lr_scale_factor("adascale", b, b0, bs) == pytest.approx((ratio + 1) / (ratio / 4 + 1))
    assert adascale_gain(b, b0, bs) == pytest.approx(4 * pollux_efficiency(bs, b, b0))
    assert adascale_gain(b, b0, 1e12) == pytest.approx(4.0)   # noise dominated -> linear
    assert adascale_gain(b, b0, 1e-9) == pytest.approx(1.0)   # no noise -> no scaling
    with pytest.raises(ValueError, match="B_simple"):
        lr_scale_factor("adascale", b, b0, None)
    with pytest.raises(ValueError):
        lr_scale_factor("cubic", b, b0)


def test_lr_scaler_state():
    s = LRScaler("adascale", 256)
    assert s.factor(512) == 1.0                 # no B_simple yet: safe lower bound
    f = s.factor(512, 256.0)
    assert f == pytest.approx(2 * 512 / 768)
    assert s.factor(512, float("nan")) == f     # keeps the last valid estimate
    t = LRScaler("adascale", 256)
    t.load_state_dict(s.state_dict())
    assert t.factor(512) == f


def test_flags_map_to_fields():
    p = add_batch_growth_args(argparse.ArgumentParser())
    args = p.parse_args(["--batch-growth", "ramp", "--batch-growth-max", "1024",
                         "--rampup-batch-size", "32", "32", "1000", "--lr-scaling", "sqrt"])
    c = BatchGrowthConfig.from_args(args)
    assert c.batch_growth == "ramp" and c.rampup_batch_size == [32, 32, 1000]
    assert c.lr_scaling == "sqrt" and c.bounds(64) == (64, 1024)
    # A parser that already has Megatron's --rampup-batch-size keeps its own.
    meg = argparse.ArgumentParser()
    meg.add_argument("--rampup-batch-size", nargs="*")
    add_batch_growth_args(meg)


@pytest.mark.parametrize("kw, msg", [
    (dict(batch_growth="gns"), "--batch-growth-max"),
    (dict(batch_growth="ramp", batch_growth_max=64), "--rampup-batch-size"),
    (dict(batch_growth_min=512, batch_growth_max=256), "below"),
    (dict(batch_growth_threshold=0.9), "threshold"),
    (dict(mfu_assumed=0.0), "mfu"),
    (dict(batch_growth="sometimes"), "not one of"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        BatchGrowthConfig(**kw)


def test_validate_against_gns():
    BatchGrowthConfig(batch_growth="ramp", batch_growth_max=64,
                      rampup_batch_size=[16, 16, 100]).validate_against(False)
    with pytest.raises(ValueError, match="--gns"):
        BatchGrowthConfig(batch_growth="goodput", batch_growth_max=64).validate_against(False)
    with pytest.raises(ValueError, match="adascale"):
        BatchGrowthConfig(lr_scaling="adascale").validate_against(False)
    BatchGrowthConfig(batch_growth="gns", batch_growth_max=64).validate_against(True)
