"""Step time as a function of the micro-batch: a saturating per-micro-batch efficiency and
its online fit to measured step times (pure Python).

Main API: `DEFAULT_OVERHEAD_TOKENS`, `micro_batch_efficiency(tokens, overhead_tokens)` and
`StepTimeEstimator(prior_per_token_s, overhead_tokens)` with `observe(...)`, `fit()`,
`micro_batch_time(tokens)`, `state_dict()` / `load_state_dict()`.

Model. One micro-batch of b sequences of s tokens costs k * (b*s + t_half) seconds on one
model replica: k is the time per token at a large micro-batch and t_half a fixed cost per
micro-batch, counted in tokens (kernel launches and Python work per micro-batch, pipeline
send/recv, GEMMs with few rows that fill the tensor cores poorly). Equivalently a
micro-batch runs at efficiency eff = b*s / (b*s + t_half) of the large-micro-batch rate
(1/2 at b*s = t_half), so fewer, larger micro-batches make a step faster.

Default t_half = 512 tokens: an ASSUMPTION, not a measurement (this project has not timed a
GPU step yet). With it micro-batch 1 at s = 2048 runs at 80% and micro-batch 8 at 97% of the
asymptotic rate; the planner's `mfu_assumed` is the MFU at that asymptote. Measured step
times replace both (`fit`): calibrate it on a GPU by running two micro-batch sizes.

Fit. Per (micro-batch, accumulation) the estimator keeps an EMA of the measured step time
(the first measurement of a split, a warm-up step, is replaced by the second).
The part the planner models separately (`fixed_s`: exposed gradient communication and the
optimizer step; 0 where there is no model for the device) is subtracted and the rest divided
by the micro-batch slots the step runs (m + pp - 1 with 1F1B, Narayanan et al. 2021), which
gives the time y of one micro-batch of b*s tokens. With two or more micro-batch sizes
measured, weighted least squares of y = k*(b*s) + k*t_half gives k and t_half; with one
size, k = y / (b*s + t_half) at the prior t_half.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

DEFAULT_OVERHEAD_TOKENS = 512.0


def micro_batch_efficiency(tokens: float, overhead_tokens: float) -> float:
    """Throughput of a micro-batch of `tokens` tokens relative to a very large one."""
    return tokens / (tokens + overhead_tokens)


class StepTimeEstimator:
    """Prior (k, t_half) refined online from measured step times."""

    def __init__(self, prior_per_token_s: Optional[float],
                 overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS, ema: float = 0.8):
        """`prior_per_token_s`: k from the device model (None: no model for this device,
        so no prediction before the first measurement); `ema`: weight of the old value when
        a (micro-batch, accumulation) is measured again."""
        if overhead_tokens < 0:
            raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.prior_per_token_s = prior_per_token_s
        self.prior_overhead_tokens = float(overhead_tokens)
        self.ema = ema
        # "mbs,m" -> [tokens per micro-batch, slots, fixed_s, EMA seconds, count]
        self.points: Dict[str, list] = {}
        self._fitted: Optional[Tuple[Optional[float], float]] = None

    @property
    def measured(self) -> bool:
        return bool(self.points)

    def observe(self, mbs: int, m: int, tokens: float, slots: float, fixed_s: float,
                seconds: float) -> None:
        """A measured step: micro-batch `mbs` (of `tokens` tokens) x `m` accumulation steps,
        run in `slots` micro-batch slots, `fixed_s` of it modelled apart."""
        if not seconds or seconds <= 0:
            return
        key = f"{int(mbs)},{int(m)}"
        old = self.points.get(key)
        # The first step of a split pays warm-up (allocator growth, autotuning, first
        # communicator use): the second measurement replaces it instead of averaging.
        fresh = old is None or old[4] == 1
        ema_s = seconds if fresh else self.ema * old[3] + (1 - self.ema) * seconds
        self.points[key] = [float(tokens), float(slots), float(fixed_s), ema_s,
                            1 if old is None else old[4] + 1]
        self._fitted = None

    def fit(self) -> Tuple[Optional[float], float]:
        """(k seconds per token or None, t_half tokens) from the measurements, else the prior."""
        if self._fitted is None:
            self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> Tuple[Optional[float], float]:
        t_half = self.prior_overhead_tokens
        if not self.points:
            return self.prior_per_token_s, t_half
        # (x tokens, y seconds per micro-batch, weight) per measured split.
        pts = [(x, max(s - fixed, 1e-12) / slots, min(n, 20))
               for x, slots, fixed, s, n in self.points.values()]
        if len({x for x, _, _ in pts}) >= 2:
            w = sum(p[2] for p in pts)
            mx = sum(x * n for x, _, n in pts) / w
            my = sum(y * n for _, y, n in pts) / w
            var = sum(n * (x - mx) ** 2 for x, _, n in pts)
            slope = sum(n * (x - mx) * (y - my) for x, y, n in pts) / var
            intercept = my - slope * mx
            if slope > 0 and intercept >= 0:
                return slope, intercept / slope
        k = sum(n * y / (x + t_half) for x, y, n in pts) / sum(n for _, _, n in pts)
        return k, t_half

    def micro_batch_time(self, tokens: float) -> Optional[float]:
        """Seconds of one micro-batch of `tokens` tokens on one replica (None: no model)."""
        k, t_half = self.fit()
        return None if k is None else k * (tokens + t_half)

    def describe(self) -> str:
        k, t_half = self.fit()
        if not self.points:
            src = "prior" if k is not None else "no step-time model for this device"
        else:
            src = f"fitted to {len(self.points)} measured split(s)"
        return f"per-micro-batch overhead {t_half:.0f} tokens ({src})"

    def state_dict(self) -> dict:
        return {"prior_overhead_tokens": self.prior_overhead_tokens, "ema": self.ema,
                "points": {k: list(v) for k, v in self.points.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the measurements; the prior stays the one this run was built with (a
        resumed run may be on another device)."""
        self.points = {k: list(v) for k, v in state.get("points", {}).items()}
        self._fitted = None


__all__ = ["DEFAULT_OVERHEAD_TOKENS", "StepTimeEstimator", "micro_batch_efficiency"]
