"""Tests of megatron_ext.batch_growth.controller (ramp, gns, goodput, hysteresis, resume)."""
import copy

import pytest

from megatron_ext.batch_growth import (BatchController, BatchGrowthConfig, BatchPlanner,
                                       Progress, Topology)


def cfg(**kw):
    # (rounding "any": these tests pin the multiples-of-the-quantum arithmetic; the default
    # "efficient" grid is tested in test_batch_growth_rounding.py)
    base = dict(batch_growth="gns", batch_growth_max=1024, batch_growth_interval=10,
                batch_growth_min_steps=0, batch_growth_threshold=1.0,
                batch_growth_rounding="any")
    base.update(kw)
    return BatchGrowthConfig(**base)


def comm_bound_planner(dp=8):
    """2 nodes on a slow network: the gradient reduction dominates small batches."""
    topo = Topology(num_nodes=2, gpus_per_node=4, inter_node_bw_GBps=1.0)
    return BatchPlanner(model_flops_per_sample=1e12, param_count=1_000_000_000, topology=topo,
                        dp_size=dp, max_micro_batch_size=4, seq_length=1024)


class Run:
    """The caller's side: owns the batch and the counts, applies what the controller says."""

    def __init__(self, ctl, batch):
        self.ctl, self.batch, self.samples = ctl, batch, 0

    def step(self, it, tokens, b_simple, step_time=None):
        self.samples += self.batch
        new = self.ctl.step(Progress(it, self.samples, tokens, self.batch), b_simple, step_time)
        self.batch = new or self.batch
        return new


def run(ctl, steps, b_simple, batch, start=1, step_time=None):
    """Drive the controller for `steps` optimizer steps; return the batch after each."""
    r, out = Run(ctl, batch), []
    for it in range(start, start + steps):
        r.step(it, it * 1000, b_simple, step_time)
        out.append(r.batch)
    return out


def test_off_never_changes():
    ctl = BatchController(BatchGrowthConfig(), 64)
    assert run(ctl, 50, 1e6, 64) == [64] * 50


def test_ramp_follows_megatron_schedule():
    # start 32, +32 every 1000 / ((128-32)/32) = 333.3 samples, up to 128.
    c = BatchGrowthConfig(batch_growth="ramp", batch_growth_max=128,
                          rampup_batch_size=[32, 32, 1000])
    r = Run(BatchController(c, 32, granularity=32), 32)
    seen = []
    for it in range(1, 40):
        r.step(it, 0, None)
        expect = min(128, 32 + int(r.samples / (1000 / 3)) * 32)
        assert r.batch == expect
        seen.append(r.batch)
    assert seen[0] == 32 and seen[-1] == 128 and sorted(seen) == seen
    assert sorted(set(seen)) == [32, 64, 96, 128]


def test_gns_target_clamped_and_rounded():
    ctl = Run(BatchController(cfg(), 64, granularity=32), 64)
    assert ctl.step(10, 0, 300.0) == 288          # k*B_simple=300 rounded down to 32k
    assert "gns" in ctl.ctl.last_decision.reason and ctl.ctl.last_decision.changed
    assert ctl.step(20, 0, 50_000.0) == 1024      # clamped to --batch-growth-max
    assert ctl.step(30, 0, 1e9) is None           # already at the maximum
    k2 = Run(BatchController(cfg(batch_growth_k=2.0), 64, granularity=32), 64)
    assert k2.step(10, 0, 100.0) == 192


def test_gns_uses_planner_validity():
    planner = comm_bound_planner(dp=8)
    ctl = Run(BatchController(cfg(batch_growth_max=4096), 32, planner=planner), 32)
    new = ctl.step(10, 0, 100.0)
    assert new == 96 and planner.is_valid(new)   # largest multiple of dp=8 <= 100


def test_gns_waits_for_b_simple_and_interval():
    ctl = Run(BatchController(cfg(batch_growth_interval=10), 64, granularity=32), 64)
    assert all(ctl.step(i, 0, None) is None for i in range(1, 11))
    assert ctl.ctl.last_decision.reason == "no B_simple estimate yet"
    assert ctl.step(11, 0, float("nan")) is None  # not a decision step
    assert [ctl.step(i, 0, 500.0) for i in range(12, 21)][-1] == 480  # decides at step 20


def test_token_interval():
    ctl = Run(BatchController(cfg(batch_growth_interval_tokens=10_000), 64, granularity=32), 64)
    assert ctl.step(1, 5_000, 500.0) is None
    assert ctl.step(2, 10_000, 500.0) == 480


def test_goodput_grows_when_noise_dominates_and_stays_otherwise():
    planner = comm_bound_planner()
    big = Run(BatchController(cfg(batch_growth="goodput", batch_growth_max=2048), 32,
                              planner=planner), 32)
    new = big.step(10, 0, 1e6)                    # B_noise >> B: efficiency ~1 everywhere
    assert new is not None and new > 32
    assert big.ctl.last_decision.gain > 1.0 and big.ctl.last_decision.rule == "goodput"
    small = Run(BatchController(cfg(batch_growth="goodput", batch_growth_max=2048), 512,
                                planner=planner), 512)
    assert small.step(10, 0, 1.0) is None         # B_noise << B: larger batch wastes samples
    assert "best" in small.ctl.last_decision.reason


def test_goodput_step_time_correction():
    planner = comm_bound_planner()
    ctl = BatchController(cfg(batch_growth="goodput", batch_growth_max=2048,
                              batch_growth_step_time_ema=0.5), 32, planner=planner)
    pred = planner.plan(32).predicted_step_time_s
    ctl.step(Progress(1, 32, 0, 32), None, 2 * pred)
    ctl.step(Progress(2, 64, 0, 32), None, 4 * pred)
    assert ctl.correction[32] == pytest.approx(3.0)   # 0.5*2 + 0.5*4
    expect = 3.0 * planner.plan(64).predicted_step_time_s  # borrows the nearest measured
    assert ctl.predicted_step_time(64) == pytest.approx(expect)


def test_hysteresis_threshold_and_min_steps():
    ctl = Run(BatchController(cfg(batch_growth_threshold=1.5), 64, granularity=8), 64)
    assert ctl.step(10, 0, 80.0) is None          # 80/64 = 1.25 < 1.5
    assert "threshold" in ctl.ctl.last_decision.reason
    assert ctl.step(20, 0, 100.0) == 96           # 96/64 = 1.5
    slow = Run(BatchController(cfg(batch_growth_min_steps=50), 64, granularity=8), 64)
    assert all(slow.step(i, 0, 500.0) is None for i in range(1, 50))
    assert "steps at current batch" in slow.ctl.last_decision.reason
    assert slow.step(50, 0, 500.0) == 496


def test_never_shrinks():
    ctl = Run(BatchController(cfg(), 64, granularity=32), 64)
    sizes = [ctl.step(10 * i, 0, bs) or ctl.batch
             for i, bs in enumerate([500, 100, 10, 1000, 3], start=1)]
    assert sizes == sorted(sizes) and sizes[-1] == 992
    assert [h["new"] for h in ctl.ctl.history] == [480, 992]


def test_goodput_requires_planner_and_valid_initial():
    with pytest.raises(ValueError, match="BatchPlanner"):
        BatchController(cfg(batch_growth="goodput"), 64)
    with pytest.raises(ValueError, match="not valid"):
        BatchController(cfg(), 30, planner=comm_bound_planner(dp=8))


def test_state_dict_round_trip_mid_growth():
    planner = comm_bound_planner()
    c = cfg(batch_growth="goodput", batch_growth_max=2048, batch_growth_min_steps=20,
            batch_growth_threshold=1.05)
    a = Run(BatchController(c, 32, planner=planner), 32)
    noise = lambda it: 50.0 * 1.05 ** (it / 10)  # growing B_noise
    for it in range(1, 121):
        a.step(it, it * 100, noise(it), planner.plan(a.batch).predicted_step_time_s * 1.3)
    assert len(a.ctl.history) >= 1
    state = copy.deepcopy(a.ctl.state_dict())
    b = Run(BatchController(c, 32, planner=planner), a.batch)  # the batch is the caller's
    b.samples = a.samples
    b.ctl.load_state_dict(state)
    for it in range(121, 401):
        t = planner.plan(a.batch).predicted_step_time_s * 1.3
        assert a.step(it, it * 100, noise(it), t) == b.step(it, it * 100, noise(it), t)
        assert a.batch == b.batch
    assert a.ctl.state_dict() == b.ctl.state_dict()
    assert len(a.ctl.history) >= 2


def test_ramp_is_megatron_cores_calculator():
    """--batch-growth ramp asks megatron-core's RampupBatchsizeNumMicroBatchesCalculator."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    from megatron_ext.batch_growth.ramp import megatron_rampup

    ramp = megatron_rampup(16, 8, 1000, final=64)
    ref = RampupBatchsizeNumMicroBatchesCalculator(64, 1, 1, False, -1, 16, 8, 1000)
    for consumed in range(0, 1400, 7):
        ref.update(consumed, consistency_check=False)
        assert ramp(consumed) == ref.get_current_global_batch_size()
    assert megatron_rampup(64, 8, 1000, final=64)(0) == 64
