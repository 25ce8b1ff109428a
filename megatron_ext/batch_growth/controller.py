"""Controller that grows the global batch during training (never shrinks it).

Main API: `BatchController(config, initial_global_batch, planner=None, granularity=None,
ramp=None)` with `step(progress, b_simple, step_time_s) -> Optional[int]` (the new global
batch when it should change, else None), `last_decision`, `history`, `state_dict()` /
`load_state_dict()`; `Progress` is what it reads of the run.

The controller owns only its decision state (hysteresis counters, step-time corrections,
history). Where the run stands (iteration, consumed samples and tokens, the current global
batch) is read from the caller's `Progress`, which comes from the training state, the one
owner of those numbers; the caller applies the returned batch.

Rules (`--batch-growth`):
  ramp     Megatron's --rampup-batch-size schedule over consumed samples, computed by
           megatron-core's own ramp-up calculator (`ramp.py`), then rounded to a valid batch.
  gns      target k * B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch
           Training": the critical batch is ~B_noise ~ B_simple), clamped and rounded down;
           with --batch-growth-lr-aware, k * B_simple * lr/lr_peak (see `_decide_gns`).
  goodput  argmax_B throughput(B) * efficiency(B), efficiency(B) = (B_noise + B0) /
           (B_noise + B) (Pollux, Qiao et al. OSDI'21, eq. 8; B0 = initial batch), with
           throughput from the planner's step-time model times a per-batch-size EMA of
           measured/predicted step time.
Hysteresis (gns, goodput): grow only after --batch-growth-min-steps steps at the current
batch and only when the predicted gain is >= --batch-growth-threshold.
Batches come from `rounding.BatchGrid` (--batch-growth-rounding): with `efficient`, quantum x
{1, 2, 3, 4, 6, 8, ...}, intersected with the planner's valid batches.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

from .config import BatchGrowthConfig
from .rounding import BatchGrid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where the run stands after a completed optimizer step (read from the train state)."""

    iteration: int
    """Completed optimizer steps."""
    consumed_samples: int
    """Samples of all completed steps."""
    consumed_tokens: int
    """Tokens of all completed steps."""
    global_batch: int
    """The global batch the run uses now."""
    lr_fraction: float = 1.0
    """The LR schedule's current LR over its peak (before --lr-scaling); read by the
    LR-aware `gns` target."""


@dataclass
class Decision:
    """One evaluation of the growth rule (`changed` tells whether the batch grew)."""

    iteration: int
    tokens: int
    rule: str
    current: int
    candidate: Optional[int]
    gain: Optional[float]
    b_simple: Optional[float]
    changed: bool
    reason: str


def pollux_efficiency(b_noise: float, batch: float, base_batch: float) -> float:
    """Statistical efficiency of `batch` relative to `base_batch` (Pollux eq. 8): the
    progress per sample at `batch` over that at `base_batch`, in (0, 1] for batch >= base."""
    return (b_noise + base_batch) / (b_noise + batch)


class BatchController:
    """Decides when and how far to grow the global batch."""

    def __init__(self, config: BatchGrowthConfig, initial_global_batch: int,
                 planner=None, granularity: Optional[int] = None,
                 ramp: Optional[Callable[[int], int]] = None):
        """`planner` (a BatchPlanner) defines the valid batches and the step-time model
        (required for `goodput`); without it batches are multiples of `granularity`
        (micro_batch_size * dp; default 1). `ramp` maps consumed samples to the ramp's
        target batch (default: megatron-core's calculator for --rampup-batch-size)."""
        if initial_global_batch < 1:
            raise ValueError(f"initial_global_batch must be >= 1, got {initial_global_batch}")
        if config.batch_growth == "goodput" and planner is None:
            raise ValueError("--batch-growth=goodput needs a BatchPlanner for the step-time "
                             "model; pass planner=BatchPlanner(...) or use --batch-growth=gns")
        if planner is not None and not planner.is_valid(initial_global_batch):
            raise ValueError(f"initial global batch {initial_global_batch} is not valid for the "
                             f"planner (dp={planner.dp_size}, pp={planner.pp_size}); pick a "
                             "multiple of micro_batch_size*dp")
        self.config = config
        self.planner = planner
        self.granularity = int(granularity or 1)
        if planner is None and initial_global_batch % self.granularity:
            raise ValueError(f"initial global batch {initial_global_batch} is not a multiple "
                             f"of granularity {self.granularity}")
        if config.batch_growth == "ramp" and ramp is None:
            from .ramp import megatron_rampup

            ramp = megatron_rampup(*config.rampup_batch_size, final=config.batch_growth_max)
        self.ramp = ramp
        # Quantum of the grid: the data-parallel size (planner) or micro x dp (granularity);
        # the planner additionally checks each size splits into its micro-batches.
        quantum = planner.dp_size if planner is not None else self.granularity
        self.grid = BatchGrid(quantum, config.batch_growth_rounding)
        # the ramp reproduces Megatron's --rampup-batch-size sizes, not the grid's
        self.ramp_grid = BatchGrid(quantum, "any")
        self.base_global_batch = initial_global_batch
        self.lo, self.hi = config.bounds(initial_global_batch)
        self.changed_at_iteration = 0
        self.last_decision_iteration = 0
        self.last_decision_tokens = 0
        self.correction: Dict[int, float] = {}
        self.last_decision: Optional[Decision] = None
        self.history: List[dict] = []

    # ------------------------------------------------------------------ helpers
    def _valid(self, lo: int, hi: int, grid: Optional[BatchGrid] = None) -> List[int]:
        """Grid sizes in [lo, hi] that the planner (if any) can split."""
        sizes = (grid or self.grid).batches(lo, hi)
        if self.planner is not None:
            sizes = [b for b in sizes if self.planner.is_valid(b)]
        return sizes

    def _round_down(self, target: float, current: int,
                    grid: Optional[BatchGrid] = None) -> Optional[int]:
        """Largest valid batch in (current, target] (None if there is none)."""
        target = int(math.floor(target))
        valid = self._valid(current + 1, target, grid) if target > current else []
        return valid[-1] if valid else None

    def _candidates(self, current: int) -> List[int]:
        return sorted(set(self._valid(max(current, self.lo), self.hi)) | {current})

    def _correction_for(self, batch: int) -> float:
        """Measured/predicted step-time factor; unmeasured sizes borrow the nearest measured
        one in log space (the model's error is mostly a smooth function of B)."""
        if batch in self.correction:
            return self.correction[batch]
        if not self.correction:
            return 1.0
        near = min(self.correction, key=lambda b: abs(math.log(b / batch)))
        return self.correction[near]

    def predicted_step_time(self, batch: int) -> float:
        return self.planner.plan(batch).predicted_step_time_s * self._correction_for(batch)

    def goodput(self, batch: int, b_noise: float) -> float:
        """Samples/s x statistical efficiency (useful samples per second, Pollux)."""
        throughput = batch / self.predicted_step_time(batch)
        return throughput * pollux_efficiency(b_noise, batch, self.base_global_batch)

    def _record_step_time(self, batch: int, step_time_s: Optional[float]) -> None:
        if self.planner is None or not step_time_s or step_time_s <= 0:
            return
        ratio = step_time_s / self.planner.plan(batch).predicted_step_time_s
        ema = self.config.batch_growth_step_time_ema
        old = self.correction.get(batch)
        self.correction[batch] = ratio if old is None else ema * old + (1 - ema) * ratio

    def plan(self, batch: int):
        """The planner's Plan (micro-batch, accumulation steps) for `batch`, or None."""
        return self.planner.plan(batch) if self.planner is not None else None

    # ------------------------------------------------------------------ rules
    def _decide_ramp(self, p: Progress):
        target = max(self.lo, min(self.hi, self.ramp(p.consumed_samples)))
        cand = self._round_down(target, p.global_batch, self.ramp_grid)
        gain = target / p.global_batch
        if cand is None:
            return None, gain, f"ramp target {target} at {p.consumed_samples} samples"
        return cand, gain, f"ramp: {p.consumed_samples} samples consumed -> {target}"

    def _decide_gns(self, b_simple: float, current: int, lr_fraction: float = 1.0):
        """Target k * B_simple. LR-aware: B_simple measured at an LR decayed to a fraction f
        of its peak is inflated by about 1/f (the "temperature" eta/B sets the noise level
        the iterate settles to, Smith & Le 2018, Mandt et al. 2017; McCandlish et al.'s
        eps_opt(B) = eps_max / (1 + B_noise / B) ties step size and batch), so the batch
        that the peak-LR noise scale calls for is k * B_simple * f: no growth that merely
        chases the decay."""
        k = self.config.batch_growth_k
        if self.config.batch_growth_lr_aware:
            k *= max(0.0, min(1.0, lr_fraction))
        target = min(max(k * b_simple, self.lo), self.hi)
        cand = self._round_down(target, current)
        if cand is None:
            return None, target / current, (
                f"gns: target {k:g}*B_simple={k * b_simple:.1f} (clamped {target:.0f}) "
                f"has no valid batch above {current}")
        return cand, cand / current, (f"gns: target {k:g}*B_simple={k * b_simple:.1f} clamped "
                                      f"to [{self.lo}, {self.hi}] -> valid {cand}")

    def _decide_goodput(self, b_simple: float, current: int):
        cands = self._candidates(current)
        scores = {b: self.goodput(b, b_simple) for b in cands}
        best = max(cands, key=lambda b: (scores[b], -b))  # ties: smaller batch
        gain = scores[best] / scores[current]
        if best == current:
            return None, 1.0, (f"goodput: current {current} is best among "
                               f"{len(cands)} candidates (B_noise={b_simple:.1f})")
        return best, gain, (f"goodput: B={best} goodput {scores[best]:.1f} vs "
                            f"{scores[current]:.1f} at {current} "
                            f"(B_noise={b_simple:.1f}, {len(cands)} candidates)")

    def _due(self, p: Progress) -> bool:
        if self.config.batch_growth == "ramp":
            return True  # a schedule, evaluated every step
        if self.config.batch_growth_interval_tokens:
            return (p.consumed_tokens - self.last_decision_tokens
                    >= self.config.batch_growth_interval_tokens)
        return p.iteration - self.last_decision_iteration >= self.config.batch_growth_interval

    def _hold(self, p: Progress, gain: float) -> Optional[str]:
        """Why hysteresis keeps the batch (gns, goodput), or None to grow."""
        steps_here = p.iteration - self.changed_at_iteration
        if steps_here < self.config.batch_growth_min_steps:
            return (f"hold: {steps_here} < {self.config.batch_growth_min_steps} steps at "
                    "current batch")
        if gain < self.config.batch_growth_threshold:
            return f"hold: gain {gain:.3f} < threshold {self.config.batch_growth_threshold}"
        return None

    # ------------------------------------------------------------------ main entry
    def step(self, p: Progress, b_simple: Optional[float] = None,
             step_time_s: Optional[float] = None) -> Optional[int]:
        """Call after every optimizer step with the run's progress, the B_simple EMA (None
        or NaN when not available) and the measured time of the step that just ran.
        Returns the global batch to use from the next step on if it grows now, else None."""
        rule, current = self.config.batch_growth, p.global_batch
        self._record_step_time(current, step_time_s)
        if rule == "off" or not self._due(p):
            return None
        self.last_decision_iteration, self.last_decision_tokens = p.iteration, p.consumed_tokens
        ok = b_simple is not None and math.isfinite(b_simple) and b_simple > 0
        bs = b_simple if ok else None
        if current >= self.hi:
            cand, gain, reason = None, None, f"at the maximum global batch {self.hi}"
        elif rule == "ramp":
            cand, gain, reason = self._decide_ramp(p)
        elif bs is None:
            cand, gain, reason = None, None, "no B_simple estimate yet"
        elif rule == "gns":
            cand, gain, reason = self._decide_gns(bs, current, p.lr_fraction)
        else:
            cand, gain, reason = self._decide_goodput(bs, current)
        hold = self._hold(p, gain) if cand is not None and rule != "ramp" else None
        if hold:
            reason += "; " + hold
        changed = cand is not None and hold is None
        self.last_decision = Decision(p.iteration, p.consumed_tokens, rule, current, cand, gain,
                                      bs, changed, reason)
        if not changed:
            logger.debug("batch growth hold at iteration %d: %s", p.iteration, reason)
            return None
        self.changed_at_iteration = p.iteration
        self.history.append(dict(iteration=p.iteration, tokens=p.consumed_tokens, old=current,
                                 new=cand, gain=gain, reason=reason))
        logger.info("batch growth at iteration %d: %d -> %d (%s)", p.iteration, current, cand,
                    reason)
        return cand

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return dict(rule=self.config.batch_growth, base_global_batch=self.base_global_batch,
                    changed_at_iteration=self.changed_at_iteration,
                    last_decision_iteration=self.last_decision_iteration,
                    last_decision_tokens=self.last_decision_tokens,
                    correction={int(k): float(v) for k, v in self.correction.items()},
                    history=[dict(h) for h in self.history],
                    last_decision=asdict(self.last_decision) if self.last_decision else None)

    def load_state_dict(self, state: dict) -> None:
        """Restore (also from checkpoints written before the train state owned the batch and
        the sample count: their extra keys are ignored)."""
        if state.get("rule") != self.config.batch_growth:
            logger.warning("batch growth rule changed on resume: %s -> %s (continuing from the "
                           "checkpointed batch)", state.get("rule"), self.config.batch_growth)
        self.base_global_batch = int(state["base_global_batch"])
        self.lo, self.hi = self.config.bounds(self.base_global_batch)
        self.changed_at_iteration = int(state["changed_at_iteration"])
        self.last_decision_iteration = int(state["last_decision_iteration"])
        self.last_decision_tokens = int(state["last_decision_tokens"])
        self.correction = {int(k): float(v) for k, v in state["correction"].items()}
        self.history = [dict(h) for h in state["history"]]
        ld = state.get("last_decision")
        self.last_decision = Decision(**ld) if ld else None
