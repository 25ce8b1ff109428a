"""Gradient-noise-scale estimator (pure Python, no torch).

Main API: `GNSEstimator.update(small_sq_norms, small_batch, big_sq_norm, big_batch, tokens)`
returns a `GNSMeasurement` (or None for a skipped step); `b_simple` is the current estimate.

Memory of the EMAs: `ema_decay` per update (counted in steps), or with `ema_tokens` a decay
of exp(-dT / ema_tokens) for an update that covers dT new tokens, so the memory is the same
number of tokens whatever the batch (issue 13: counted in steps it was ~160 samples at
batch 8 and ~1200 at batch 60, so while B_simple rose the batch trailed it by 10-30%).

Background (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
the simple noise scale is B_simple = tr(Sigma) / |G|^2, with G the true gradient and Sigma the
per-sample gradient covariance. For a batch of B independent samples with per-sample
gradients g_i (gradient of sample i's own mean-token loss) and batch gradient
G_B = mean_i g_i:

    E|g_i|^2 = |G|^2 + tr(Sigma)           E|G_B|^2 = |G|^2 + tr(Sigma) / B

so with mean_sq = mean_i |g_i|^2 the unbiased estimates are

    tr(Sigma) = B / (B - 1) * (mean_sq - |G_B|^2)
    |G|^2     = (B * |G_B|^2 - mean_sq) / (B - 1)

The two-batch-size estimator (App. A.1) uses the same identities with two batch sizes
B_small < B_big (small = one data-parallel rank's gradient, big = the all-reduced one):

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

With B_small = 1 and |G_small|^2 = mean_sq these are exactly the per-sample estimates
above, so one `update` serves both estimators.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

ESTIMATORS = ("per-sample", "data-parallel")


@dataclass
class GNSMeasurement:
    """One accepted update: instantaneous (raw) and smoothed values."""

    step: int
    """Number of accepted updates so far, this one included."""
    tokens: int
    """Tokens consumed by training up to and including this step, as given by the caller
    (x axis of the B_simple plot)."""
    batch_size: float
    """B of the per-sample estimator, or B_big of the two-batch estimator."""
    grad_sq_norm: float
    """Raw unbiased estimate of |G|^2 of this step (can be negative: it is a difference)."""
    trace_sigma: float
    """Raw unbiased estimate of tr(Sigma) of this step."""
    grad_sq_norm_ema: float
    """Bias-corrected EMA of |G|^2."""
    trace_sigma_ema: float
    """Bias-corrected EMA of tr(Sigma)."""
    b_simple: Optional[float]
    """Ratio of the EMAs, None while the |G|^2 EMA is <= 0."""
    b_simple_raw: Optional[float]
    """Ratio of this step's raw estimates (very noisy; None when raw |G|^2 <= 0)."""

    def to_dict(self) -> dict:
        return asdict(self)


class _BiasCorrectedEMA:
    """EMA with Adam-style bias correction, so early values are not pulled towards 0; the
    decay may change per update (`weight` = 1 - product of the decays so far)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.biased = 0.0
        self.count = 0
        self.weight = 0.0

    def update(self, x: float, decay: Optional[float] = None) -> None:
        d = self.decay if decay is None else decay
        self.biased = d * self.biased + (1.0 - d) * x
        self.weight = d * self.weight + (1.0 - d)
        self.count += 1

    @property
    def value(self) -> Optional[float]:
        if self.count == 0 or self.weight <= 0.0:
            return None
        return self.biased / self.weight


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class GNSEstimator:
    """Streaming estimator of B_simple = tr(Sigma) / |G|^2.

    We keep separate bias-corrected EMAs of the numerator tr(Sigma) and the denominator
    |G|^2 and report their ratio, *not* an EMA of per-step ratios: each per-step estimate
    is unbiased but noisy, and E[X/Y] != E[X]/E[Y] (the ratio of noisy estimates is biased
    and heavy-tailed); worse, the per-step |G|^2 estimate is a difference of two similar
    numbers and is often <= 0 late in training, where its ratio is meaningless. Averaging
    numerator and denominator first gives a consistent estimate (McCandlish et al. 2018,
    App. A.1 do the same).
    """

    def __init__(self, ema_decay: float = 0.95, estimator: str = "per-sample",
                 ema_tokens: Optional[float] = None):
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if ema_tokens is not None and not ema_tokens > 0:
            raise ValueError(f"ema_tokens must be > 0 (or None: memory in steps), got "
                             f"{ema_tokens}")
        self.ema_tokens = None if ema_tokens is None else float(ema_tokens)
        self.last_tokens = 0
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.ema_decay = float(ema_decay)
        self.estimator = estimator
        self._trace = _BiasCorrectedEMA(self.ema_decay)
        self._gsq = _BiasCorrectedEMA(self.ema_decay)
        self.num_updates = 0
        self.num_skipped_samples = 0
        self.num_skipped_steps = 0
        self.last: Optional[GNSMeasurement] = None

    # ------------------------------------------------------------------ results
    @property
    def grad_sq_norm_ema(self) -> Optional[float]:
        return self._gsq.value

    @property
    def trace_sigma_ema(self) -> Optional[float]:
        return self._trace.value

    @property
    def b_simple(self) -> Optional[float]:
        """tr(Sigma)_EMA / |G|^2_EMA; None before the first update or while |G|^2_EMA <= 0."""
        g, t = self._gsq.value, self._trace.value
        if g is None or t is None or g <= 0.0:
            return None
        return t / g

    # ------------------------------------------------------------------ updates
    def skip_step(self) -> None:
        """Count a step whose measurement is unusable (e.g. no loss tokens)."""
        self.num_skipped_steps += 1

    def _decay(self, tokens: int) -> Optional[float]:
        """Per-update decay: None (= ema_decay) in steps, else exp(-new tokens / memory)."""
        if self.ema_tokens is None:
            return None
        return math.exp(-max(0, int(tokens) - self.last_tokens) / self.ema_tokens)

    def _accept(self, gsq: float, trace: float, batch: float, tokens: int) -> GNSMeasurement:
        decay = self._decay(tokens)
        self.last_tokens = max(self.last_tokens, int(tokens))
        self._gsq.update(gsq, decay)
        self._trace.update(trace, decay)
        self.num_updates += 1
        self.last = GNSMeasurement(
            step=self.num_updates, tokens=int(tokens), batch_size=float(batch),
            grad_sq_norm=gsq, trace_sigma=trace,
            grad_sq_norm_ema=self._gsq.value, trace_sigma_ema=self._trace.value,
            b_simple=self.b_simple, b_simple_raw=trace / gsq if gsq > 0.0 else None)
        return self.last

    def _check_batches(self, small_batch: int, big_batch: int) -> None:
        if self.estimator == "per-sample" and small_batch != 1:
            raise ValueError(f"the per-sample estimator takes per-sample norms (small_batch "
                             f"1), got small_batch={small_batch}")
        if not 0 < small_batch < big_batch:
            raise ValueError(f"need 0 < small_batch < big_batch (the per-sample estimator "
                             f"needs B >= 2 samples), got small_batch={small_batch}, "
                             f"big_batch={big_batch}")

    def update(self, small_sq_norms: Union[float, Sequence[float]], small_batch: int,
               big_sq_norm: float, big_batch: int, tokens: int) -> Optional[GNSMeasurement]:
        """Update from |G_small|^2 (each over `small_batch` samples) and |G_big|^2.

        Per-sample estimator: small_batch = 1 and the |g_i|^2 of all B = big_batch samples
        of the global batch, whose mean gradient is G_big. Data-parallel estimator: one
        |G_small|^2 per rank (a scalar is accepted too). The mean of several small norms
        has the expectation of one and less variance. `tokens`: tokens consumed by
        training up to and including this step (the caller owns that count), the x axis
        of the B_simple plot. Returns None if the step was skipped.
        """
        self._check_batches(small_batch, big_batch)
        smalls = ([small_sq_norms] if isinstance(small_sq_norms, (int, float))
                  else list(small_sq_norms))
        valid = [float(x) for x in smalls if _finite(x) and float(x) >= 0.0]
        self.num_skipped_samples += len(smalls) - len(valid)
        if not valid or not _finite(big_sq_norm) or big_sq_norm < 0:
            # Nothing to estimate (e.g. the batch gradient itself overflowed).
            self.skip_step()
            return None
        # A non-finite small norm next to a finite |G_big|^2 means its norm computation
        # overflowed, not the gradient: G_big still averages all samples, so B_big stays,
        # while E|G_small|^2 is estimated by the mean over the remaining entries. That mean
        # is unbiased if the failures are independent of the sample; overflow prefers large
        # norms, so tr(Sigma) is biased slightly low, negligible for the rare skips we
        # expect (counted in num_skipped_samples so a persistent problem is visible).
        gs = math.fsum(valid) / len(valid)
        gbig = float(big_sq_norm)
        bs, bb = float(small_batch), float(big_batch)
        gsq = (bb * gbig - bs * gs) / (bb - bs)
        trace = (gs - gbig) / (1.0 / bs - 1.0 / bb)
        return self._accept(gsq, trace, bb, tokens)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain-Python (JSON-serialisable) state; resuming from it is exact."""
        return {
            "version": 1,
            "ema_decay": self.ema_decay,
            "ema_tokens": self.ema_tokens,
            "last_tokens": self.last_tokens,
            "trace_ema_weight": self._trace.weight,
            "gsq_ema_weight": self._gsq.weight,
            "estimator": self.estimator,
            "trace_ema_biased": self._trace.biased,
            "trace_ema_count": self._trace.count,
            "gsq_ema_biased": self._gsq.biased,
            "gsq_ema_count": self._gsq.count,
            "num_updates": self.num_updates,
            "num_skipped_samples": self.num_skipped_samples,
            "num_skipped_steps": self.num_skipped_steps,
            "last": self.last.to_dict() if self.last is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version", 1) != 1:
            raise ValueError(f"unknown GNSEstimator state version {state.get('version')}")
        self.ema_decay = float(state["ema_decay"])
        self.estimator = state["estimator"]
        self._trace = _BiasCorrectedEMA(self.ema_decay)
        self._gsq = _BiasCorrectedEMA(self.ema_decay)
        self._trace.biased = float(state["trace_ema_biased"])
        self._trace.count = int(state["trace_ema_count"])
        self._gsq.biased = float(state["gsq_ema_biased"])
        self._gsq.count = int(state["gsq_ema_count"])
        # states written before the weight was kept: constant decay, 1 - decay**count
        for ema, key in ((self._trace, "trace_ema_weight"), (self._gsq, "gsq_ema_weight")):
            ema.weight = float(state.get(key, 1.0 - self.ema_decay ** ema.count))
        self.ema_tokens = state.get("ema_tokens", self.ema_tokens)
        self.last_tokens = int(state.get("last_tokens", 0))
        self.num_updates = int(state["num_updates"])
        self.num_skipped_samples = int(state["num_skipped_samples"])
        self.num_skipped_steps = int(state["num_skipped_steps"])
        # (older states also hold "tokens_seen": the caller owns the token count now)
        last = state.get("last")
        self.last = GNSMeasurement(**last) if last is not None else None
