"""The LR schedule: megatron-core's OptimizerParamScheduler, counted in samples read from the
train state (warmup, decay endpoints, styles, the batch-growth factor, weight decay per
group, resume without a counter of its own)."""

import math
import types

import pytest

from megatron_ext.training.config import OptimizerSettings, ScheduleConfig
from megatron_ext.training.lr_schedule import LRSchedule
from megatron_ext.training.state import TrainState


def _optimizer():
    """The param groups megatron-core's get_megatron_optimizer makes (decay / no decay)."""
    groups = [{"max_lr": 3e-4, "min_lr": 3e-5, "wd_mult": 1.0, "lr_mult": 1.0,
               "default_config": True},
              {"max_lr": 3e-4, "min_lr": 3e-5, "wd_mult": 0.0, "lr_mult": 1.0,
               "default_config": True}]
    return types.SimpleNamespace(param_groups=groups)


def _schedule(style="cosine", warmup=100, decay=1100, **kw):
    cfg = ScheduleConfig(lr=3e-4, min_lr=kw.pop("min_lr", 3e-5), lr_decay_style=style,
                         lr_warmup_samples=warmup, lr_decay_samples=decay)
    opt = _optimizer()
    for g in opt.param_groups:
        g["min_lr"] = cfg.min_lr
    return LRSchedule(cfg, OptimizerSettings(weight_decay=0.1), opt), opt


def _at(schedule, samples, factor=1.0):
    state = TrainState(seq_length=8, global_batch_size=4, micro_batch_size=4,
                       data_parallel_size=1, consumed_samples=samples)
    return schedule.apply(state, factor)


def test_endpoints_over_samples():
    s, _ = _schedule()
    assert _at(s, 0) == 0.0
    assert _at(s, 50) == pytest.approx(1.5e-4)
    assert _at(s, 100) == pytest.approx(3e-4)
    assert _at(s, 600) == pytest.approx((3e-4 + 3e-5) / 2)  # cosine midpoint
    assert _at(s, 1100) == pytest.approx(3e-5) and _at(s, 10**9) == pytest.approx(3e-5)
    assert _at(s, 600) == pytest.approx((3e-4 + 3e-5) / 2)  # back again: no own counter


def test_linear_and_constant_styles():
    lin, _ = _schedule("linear", warmup=0, decay=100, min_lr=0.0)
    assert _at(lin, 25) == pytest.approx(0.75 * 3e-4)
    const, _ = _schedule("constant", warmup=10, decay=10)  # decay <= warmup: constant
    assert _at(const, 5) == pytest.approx(1.5e-4) and _at(const, 10**12) == pytest.approx(3e-4)


def test_factor_and_weight_decay_per_group():
    s, opt = _schedule()
    lr = _at(s, 600, factor=2.0)
    assert lr == pytest.approx(2 * (3e-4 + 3e-5) / 2)
    assert all(g["lr"] == lr for g in opt.param_groups)
    # Megatron-LM: no weight decay on biases and norm parameters (wd_mult 0)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_cosine_matches_the_closed_form():
    s, _ = _schedule(warmup=0, decay=1000, min_lr=0.0)
    for n in (1, 123, 999):
        assert _at(s, n) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * n / 1000)))


def test_real_optimizer_decays_matrices_only():
    """On megatron-core's own param groups: biases and norm weights get no weight decay."""
    from gpt_helpers import build, one_rank_megatron

    from megatron_ext.training.job import parse_job
    from megatron_ext.training.model import build_optimizer

    job = parse_job(["--num-layers", "1", "--hidden-size", "32", "--weight-decay", "0.1"],
                    world_size=1)
    with one_rank_megatron(job):
        built = build(job, 257)
        optimizer = build_optimizer(job, built.config, built.ddp)
        schedule = LRSchedule(job.schedule, job.optimizer, optimizer)
        schedule.apply(TrainState(128, 2, 2, 1))
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        for name, p in built.gpt.named_parameters():
            expected = 0.0 if p.dim() == 1 or name.endswith(".bias") else 0.1
            assert decay[id(p)] == expected, name


def test_wsd_is_stable_then_decays_linearly_over_the_last_samples():
    cfg = ScheduleConfig(lr=3e-4, min_lr=0.0, lr_decay_style="WSD", lr_warmup_samples=100,
                         lr_decay_samples=1100, lr_wsd_decay_samples=200)
    s = LRSchedule(cfg, OptimizerSettings(weight_decay=0.1), _optimizer())
    assert _at(s, 500) == pytest.approx(3e-4) and _at(s, 900) == pytest.approx(3e-4)
    assert _at(s, 1000) == pytest.approx(1.5e-4) and _at(s, 1100) == pytest.approx(0.0)
    assert s.fraction() == pytest.approx(0.0)
    _at(s, 1000)
    assert s.fraction() == pytest.approx(0.5)   # read by --batch-growth-lr-aware
