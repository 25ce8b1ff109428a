"""Learning-rate scaling with the global batch, and a token-based LR schedule.

Main API: `lr_scale_factor(rule, global_batch, base_global_batch, b_simple=None)` and
`LRScaler(rule, base_global_batch)` (remembers the last B_simple for `adascale`). The LR
schedule itself (warmup/decay over consumed samples) is `megatron_ext.training.lr_schedule`;
the training loop multiplies it by `scaler.factor(B, b_simple)`.
"""
from __future__ import annotations

import math
from typing import Optional

from .config import LR_SCALING_RULES


def adascale_gain(global_batch: float, base_global_batch: float, b_simple: float) -> float:
    """AdaScale gain ratio r (Johnson et al. 2020, "AdaScale SGD", eq. 5):

        r = (sigma^2 + |G|^2) / (sigma^2 / S + |G|^2),   S = B / B0,

    with sigma^2 = tr(Sigma) / B0 the variance of a base-batch gradient (Sigma = per-sample
    gradient covariance) and |G|^2 the squared true gradient. Since B_simple = tr(Sigma) /
    |G|^2 (McCandlish et al. 2018), sigma^2/|G|^2 = B_simple / B0 and

        r = (B_simple / B0 + 1) / (B_simple / B + 1) = S * (B_simple + B0) / (B_simple + B),

    i.e. S times the Pollux efficiency; 1 <= r <= S. r -> S (linear scaling) when noise
    dominates (B << B_simple) and r -> 1 when B >> B_simple.
    """
    s = global_batch / base_global_batch
    return s * (b_simple + base_global_batch) / (b_simple + global_batch)


def lr_scale_factor(rule: str, global_batch: float, base_global_batch: float,
                    b_simple: Optional[float] = None) -> float:
    """LR multiplier for `global_batch` relative to `base_global_batch`.

    linear: B/B0 (Goyal et al. 2017); sqrt: sqrt(B/B0) (Krizhevsky 2014, Hoffer et al. 2017,
    natural for Adam); adascale: `adascale_gain` (needs b_simple); none: 1.
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"--lr-scaling={rule!r} is not one of {LR_SCALING_RULES}")
    if base_global_batch <= 0 or global_batch <= 0:
        raise ValueError("global batches must be positive")
    s = global_batch / base_global_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return s
    if rule == "sqrt":
        return math.sqrt(s)
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        raise ValueError("--lr-scaling=adascale needs a positive B_simple (enable --gns)")
    return adascale_gain(global_batch, base_global_batch, b_simple)


class LRScaler:
    """Stateful wrapper: `adascale` keeps the last valid B_simple so the factor stays defined
    on steps without a fresh estimate (and is 1.0, the safe lower bound, before the first)."""

    def __init__(self, rule: str, base_global_batch: int):
        if rule not in LR_SCALING_RULES:
            raise ValueError(f"--lr-scaling={rule!r} is not one of {LR_SCALING_RULES}")
        self.rule = rule
        self.base_global_batch = base_global_batch
        self.last_b_simple: Optional[float] = None

    def factor(self, global_batch: int, b_simple: Optional[float] = None) -> float:
        if b_simple is not None and math.isfinite(b_simple) and b_simple > 0:
            self.last_b_simple = float(b_simple)
        if self.rule == "adascale" and self.last_b_simple is None:
            return 1.0
        return lr_scale_factor(self.rule, global_batch, self.base_global_batch,
                               self.last_b_simple)

    def state_dict(self) -> dict:
        return dict(rule=self.rule, base_global_batch=self.base_global_batch,
                    last_b_simple=self.last_b_simple)

    def load_state_dict(self, state: dict) -> None:
        self.rule = state["rule"]
        self.base_global_batch = state["base_global_batch"]
        self.last_b_simple = state["last_b_simple"]
