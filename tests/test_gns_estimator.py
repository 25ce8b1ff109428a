"""Tests of the pure-Python gradient-noise-scale estimator and its config (no torch)."""
import argparse
import json

import numpy as np
import pytest

from megatron_ext.gns import GNSConfig, GNSEstimator, GNSMeasurement, add_gns_args


def _per_sample(est, norms, gb, tokens=0):
    """The per-sample estimator's call: small batches of 1 sample, B = len(norms)."""
    return est.update(norms, 1, gb, len(norms), tokens)


# ---------------------------------------------------------------- hand-computed formulas
def test_per_sample_formula_hand_computed():
    # B=4, mean_sq = (1+2+3+6)/4 = 3, |G_B|^2 = 1
    est = GNSEstimator(ema_decay=0.5)
    m = _per_sample(est, [1.0, 2.0, 3.0, 6.0], 1.0, tokens=100)
    assert isinstance(m, GNSMeasurement)
    assert m.trace_sigma == pytest.approx(4 / 3 * (3 - 1))      # B/(B-1) (mean_sq - |G_B|^2)
    assert m.grad_sq_norm == pytest.approx((4 * 1 - 3) / 3)     # (B|G_B|^2 - mean_sq)/(B-1)
    # bias-corrected EMA after one update equals the raw value
    assert est.trace_sigma_ema == pytest.approx(8 / 3)
    assert est.grad_sq_norm_ema == pytest.approx(1 / 3)
    assert est.b_simple == pytest.approx(8.0)
    assert m.b_simple_raw == pytest.approx(8.0)
    assert m.tokens == 100 and est.num_updates == 1 and m.batch_size == 4


def test_ratio_of_emas_not_ema_of_ratios():
    est = GNSEstimator(ema_decay=0.5)
    _per_sample(est, [1.0, 2.0, 3.0, 6.0], 1.0)   # tr=8/3, |G|^2=1/3
    _per_sample(est, [2.0, 2.0], 1.5)              # tr=2*(2-1.5)=1, |G|^2=(3-2)/1=1
    # bias-corrected EMA, decay 0.5: weights 0.25/0.75 and 0.5/0.75
    tr = (0.25 * 8 / 3 + 0.5 * 1.0) / 0.75
    g = (0.25 * 1 / 3 + 0.5 * 1.0) / 0.75
    assert est.trace_sigma_ema == pytest.approx(tr)
    assert est.grad_sq_norm_ema == pytest.approx(g)
    assert est.b_simple == pytest.approx(tr / g)


def test_two_batch_formula_hand_computed():
    est = GNSEstimator(ema_decay=0.9, estimator="data-parallel")
    # |G_small|^2 = mean(3, 5) = 4 over 2 samples, |G_big|^2 = 2 over 8 samples
    m = est.update([3.0, 5.0], 2, 2.0, 8, tokens=8)
    assert m.grad_sq_norm == pytest.approx((8 * 2 - 2 * 4) / (8 - 2))
    assert m.trace_sigma == pytest.approx((4 - 2) / (1 / 2 - 1 / 8))
    assert est.b_simple == pytest.approx(m.trace_sigma / m.grad_sq_norm)
    # a scalar small norm is accepted too
    m2 = GNSEstimator(estimator="data-parallel").update(4.0, 2, 2.0, 8, 8)
    assert m2.trace_sigma == pytest.approx(m.trace_sigma)


def test_two_batch_equals_per_sample_when_small_is_one_sample():
    # With B_small = 1 and the mean over all samples, both estimators coincide.
    norms, gb = [1.0, 2.0, 3.0, 6.0], 1.0
    a = _per_sample(GNSEstimator(), norms, gb)
    b = GNSEstimator(estimator="data-parallel").update(norms, 1, gb, 4, 0)
    assert a.trace_sigma == pytest.approx(b.trace_sigma)
    assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm)


def test_b_simple_none_before_update_and_when_denominator_not_positive():
    est = GNSEstimator()
    assert est.b_simple is None and est.grad_sq_norm_ema is None
    m = _per_sample(est, [5.0, 5.0], 4.0)  # |G|^2 = (2*4-5)/1 = 3 > 0
    assert est.b_simple is not None
    est2 = GNSEstimator()
    m = _per_sample(est2, [5.0, 5.0], 1.0)  # |G|^2 = (2-5) = -3
    assert m.grad_sq_norm < 0 and est2.b_simple is None and m.b_simple_raw is None


def test_mode_mismatch_and_bad_batches_raise():
    with pytest.raises(ValueError, match="per-sample"):  # per-sample norms are batches of 1
        GNSEstimator().update([1.0, 2.0], 2, 1.0, 4, 0)
    with pytest.raises(ValueError):
        _per_sample(GNSEstimator(), [1.0], 1.0)  # B >= 2
    with pytest.raises(ValueError):
        GNSEstimator(estimator="data-parallel").update(1.0, 4, 1.0, 4, 0)
    with pytest.raises(ValueError):
        GNSEstimator(ema_decay=1.0)


# ---------------------------------------------------------------- NaN handling
def test_nonfinite_per_sample_norms_are_skipped_and_counted():
    est = GNSEstimator(ema_decay=0.5)
    m = _per_sample(est, [1.0, float("nan"), 3.0, float("inf")], 1.0, tokens=10)
    # B stays 4 (G_B averaged all 4 samples), mean_sq over the finite ones = 2
    assert m.trace_sigma == pytest.approx(4 / 3 * (2 - 1))
    assert m.grad_sq_norm == pytest.approx((4 - 2) / 3)
    assert est.num_skipped_samples == 2 and est.num_skipped_steps == 0


def test_nonfinite_batch_norm_skips_step():
    est = GNSEstimator()
    _per_sample(est, [1.0, 2.0, 3.0, 6.0], 1.0, tokens=5)
    before = est.state_dict()
    assert _per_sample(est, [1.0, 2.0], float("nan"), tokens=12) is None
    assert _per_sample(est, [float("nan"), float("inf")], 1.0, tokens=19) is None
    assert est.num_skipped_steps == 2 and est.num_updates == 1
    assert est.b_simple == pytest.approx(8.0)  # unchanged by the skipped steps
    assert est.trace_sigma_ema == pytest.approx(before["trace_ema_biased"] / (1 - est.ema_decay))
    # skipped steps' tokens still count: the caller's running total reaches the next update
    assert _per_sample(est, [1.0, 2.0, 3.0, 6.0], 1.0, tokens=5 + 14 + 5).tokens == 24
    est.skip_step()
    assert est.num_skipped_steps == 3
    d = GNSEstimator(estimator="data-parallel")
    assert d.update([float("nan")], 1, 1.0, 4, 0) is None
    assert d.update([1.0, float("nan")], 1, float("inf"), 4, 0) is None
    assert d.num_skipped_steps == 2 and d.num_skipped_samples == 2


# ---------------------------------------------------------------- synthetic problem
def _synthetic(seed, d=64, trace=32.0):
    """Gradient distribution with known mean mu (|mu|^2 = 1) and diagonal covariance."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    mu /= np.linalg.norm(mu)
    sd = np.sqrt(rng.uniform(0.2, 1.8, size=d))
    sd *= np.sqrt(trace / (sd ** 2).sum())
    return rng, mu, sd, float((sd ** 2).sum() / (mu ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_noise_scale_per_sample(seed):
    rng, mu, sd, true_b = _synthetic(seed)
    est = GNSEstimator(ema_decay=0.998)
    for step in range(2000):
        g = mu + sd * rng.normal(size=(32, mu.size))  # [B, d] per-sample gradients
        m = _per_sample(est, (g ** 2).sum(1).tolist(), float((g.mean(0) ** 2).sum()),
                        tokens=(step + 1) * 32 * 64)
    assert est.b_simple == pytest.approx(true_b, rel=0.05)
    assert m.tokens == 2000 * 32 * 64


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_noise_scale_two_batch(seed):
    rng, mu, sd, true_b = _synthetic(seed)
    est = GNSEstimator(ema_decay=0.998, estimator="data-parallel")
    ranks, per_rank = 8, 4
    for _ in range(2000):
        g = mu + sd * rng.normal(size=(ranks * per_rank, mu.size))
        small = g.reshape(ranks, per_rank, -1).mean(1)  # [ranks, d] per-rank gradients
        est.update((small ** 2).sum(1), per_rank, float((g.mean(0) ** 2).sum()),
                   ranks * per_rank, 0)
    assert est.b_simple == pytest.approx(true_b, rel=0.05)


# ---------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("mode", ["per-sample", "data-parallel"])
def test_state_dict_round_trip_is_exact(mode):
    rng = np.random.default_rng(3)
    feed = [(rng.uniform(1, 3, size=8).tolist(), float(rng.uniform(0.5, 1.5)))
            for _ in range(40)]

    def step(est, norms, gb):
        if mode == "per-sample":
            return _per_sample(est, norms, gb, tokens=11)
        return est.update(norms, 2, gb, 16, tokens=11)

    a = GNSEstimator(0.9, mode)
    for norms, gb in feed[:20]:
        step(a, norms, gb)
    step(a, [float("nan")] * 8, float("nan"))
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    b = GNSEstimator(0.5, "per-sample")
    b.load_state_dict(state)
    assert b.last == a.last
    for norms, gb in feed[20:]:
        ma, mb = step(a, norms, gb), step(b, norms, gb)
        assert ma == mb  # bit-identical dataclasses
    assert a.state_dict() == b.state_dict()


def test_loads_old_state_that_counted_tokens():
    # States written before the caller owned the token count also hold "tokens_seen".
    a = GNSEstimator(0.9)
    m = _per_sample(a, [1.0, 2.0, 3.0, 6.0], 1.0, tokens=7)
    old = dict(a.state_dict(), tokens_seen=7)
    b = GNSEstimator()
    b.load_state_dict(old)
    assert b.state_dict() == a.state_dict() and b.last == m


# ---------------------------------------------------------------- config
def test_config_defaults_and_from_args():
    p = add_gns_args(argparse.ArgumentParser())
    cfg = GNSConfig.from_args(p.parse_args([]))
    assert cfg == GNSConfig() and not cfg.gns and cfg.gns_plot is None
    args = p.parse_args(["--gns", "--gns-estimator", "data-parallel", "--gns-ema-decay", "0.9",
                         "--gns-log-interval", "5", "--gns-plot", "out/gns.png",
                         "--gns-include-embedding", "--gns-measure-interval", "4"])
    cfg = GNSConfig.from_args(args)
    assert cfg == GNSConfig(gns=True, gns_estimator="data-parallel", gns_ema_decay=0.9,
                            gns_log_interval=5, gns_plot="out/gns.png",
                            gns_include_embedding=True, gns_measure_interval=4)


@pytest.mark.parametrize("kw, msg", [
    (dict(gns_estimator="both"), "gns-estimator"),
    (dict(gns_ema_decay=1.0), "gns-ema-decay"),
    (dict(gns_ema_decay=0.0), "gns-ema-decay"),
    (dict(gns_log_interval=0), "gns-log-interval"),
    (dict(gns_measure_interval=0), "gns-measure-interval"),
    (dict(gns_plot="gns.pdf"), "gns-plot"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GNSConfig(**kw)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_ext.gns.plot import plot_gns_history
    est = GNSEstimator(0.5)
    hist = []
    for i in range(5):
        m = _per_sample(est, [1.0 + i, 2.0, 3.0, 6.0], 1.0, tokens=1000 * (i + 1))
        hist.append(m.to_dict())
    path = tmp_path / "gns.png"
    assert plot_gns_history(hist, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_gns_history([{"tokens": 1, "b_simple": None}], tmp_path / "x.png")


def test_package_is_torch_free():
    import subprocess
    import sys
    code = ("import sys, megatron_ext.gns, megatron_ext.gns.plot; "
            "assert 'torch' not in sys.modules and 'megatron.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- memory in tokens
def test_ema_memory_in_tokens_is_the_same_whatever_the_batch():
    """A step change of the noise: with --gns-ema-tokens, B_simple has moved the same
    distance after the same number of tokens at batch 8 and at batch 64 (in steps it would
    take 8x as many tokens at batch 64)."""
    def after(batch, tokens_per_sample=128, memory=20 * 8 * 128, new_tokens=4096 * 128):
        est, t = GNSEstimator(0.95, ema_tokens=memory), 0
        for g in (1.0, 3.0):                    # |G|^2 drops 1 -> 1/3 at half-time
            for _ in range(new_tokens // (batch * tokens_per_sample)):
                t += batch * tokens_per_sample
                est._accept(1.0 / g, 10.0, batch, t)
        return est.b_simple
    assert after(8) == pytest.approx(after(64), rel=1e-6)
    assert after(8) == pytest.approx(30.0, rel=1e-3)   # long enough: the new value


def test_ema_tokens_with_constant_step_equals_step_decay():
    a, b = GNSEstimator(0.9), GNSEstimator(0.5, ema_tokens=1000 / -np.log(0.9))
    for i in range(1, 30):
        norms = [1.0 + (i % 3), 2.0, 3.0, 6.0 + i % 5]
        _per_sample(a, norms, 1.0, tokens=1000 * i)
        _per_sample(b, norms, 1.0, tokens=1000 * i)
    assert b.b_simple == pytest.approx(a.b_simple, rel=1e-12)
    state = json.loads(json.dumps(b.state_dict()))
    c = GNSEstimator()
    c.load_state_dict(state)
    assert c.ema_tokens == b.ema_tokens and c.last_tokens == 29000
    with pytest.raises(ValueError, match="ema_tokens"):
        GNSEstimator(ema_tokens=0)


def test_loads_state_written_before_the_ema_weight():
    a = GNSEstimator(0.9)
    for i in range(5):
        _per_sample(a, [1.0, 2.0, 3.0, 6.0 + i], 1.0, tokens=i)
    old = {k: v for k, v in a.state_dict().items()
           if k not in ("trace_ema_weight", "gsq_ema_weight", "ema_tokens", "last_tokens")}
    b = GNSEstimator()
    b.load_state_dict(old)
    assert b.b_simple == pytest.approx(a.b_simple, rel=1e-12)
