"""Configuration of dynamic global-batch growth.

Main API: `BatchGrowthConfig` (one dataclass, fields map 1:1 to flags),
`add_batch_growth_args(parser)` (argparse group "dynamic global batch") and
`BatchGrowthConfig.from_args(args)`.

Flag `--foo-bar` maps to field `foo_bar`. Checks that need another feature's config (the
gradient-noise-scale measurement) live in `validate_against(gns_enabled)` because the two
configs are built separately.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.config_flags import FlagConfig

from .rounding import ROUNDING_RULES

GROWTH_RULES = ("off", "ramp", "gns", "goodput")
LR_SCALING_RULES = ("none", "sqrt", "linear", "adascale")


@dataclass
class BatchGrowthConfig(FlagConfig):
    """Dynamic global-batch growth driven by the gradient noise scale."""

    flag_group = "dynamic global batch"

    batch_growth: str = field(default="off", metadata={"argparse": {"choices": GROWTH_RULES}})
    """Rule that picks the next global batch: `off` (fixed), `ramp` (Megatron-style fixed
    ramp from --rampup-batch-size), `gns` (k * B_simple, McCandlish et al. 2018) or
    `goodput` (maximise throughput x statistical efficiency, Pollux, Qiao et al. OSDI'21)."""

    batch_growth_min: Optional[int] = None
    """Lower bound of the global batch; None = the initial global batch."""

    batch_growth_max: Optional[int] = None
    """Upper bound of the global batch (the final batch of a ramp). Required unless off."""

    batch_growth_interval: int = 100
    """Optimizer steps between two growth decisions (ignored by `ramp`, which is a
    schedule evaluated every step)."""

    batch_growth_interval_tokens: Optional[int] = None
    """If set, decide every this many consumed tokens instead of every
    --batch-growth-interval steps (steps get longer as the batch grows)."""

    batch_growth_k: float = 1.0
    """`gns` rule target is k * B_simple (k=1 is the critical batch estimate)."""

    batch_growth_lr_aware: bool = False
    """`gns` rule: scale the target by the LR schedule's current LR / peak LR, since a decayed
    LR inflates B_simple by about the inverse factor (temperature eta/B)."""

    batch_growth_rounding: str = field(default="efficient", metadata={"argparse": {
        "choices": ROUNDING_RULES}})
    """Batches a growing run may pick: `efficient` = quantum x {1, 2, 3, 4, 6, 8, 12, ...}
    (quantum = data-parallel size x granularity; whole micro-batches, valid on power-of-two
    DP changes) or `any` multiple of the quantum."""

    batch_growth_threshold: float = 1.1
    """Hysteresis: grow only if the predicted gain (goodput ratio for `goodput`,
    target/current for `gns`) is at least this. Not used by `ramp` (a fixed schedule)."""

    batch_growth_min_steps: int = 100
    """Hysteresis: grow only after this many optimizer steps at the current batch (gns,
    goodput)."""

    batch_growth_step_time_ema: float = 0.9
    """EMA decay of the per-batch-size correction factor measured/predicted step time
    (`goodput` rule); 0 = use only the latest measurement."""

    rampup_batch_size: Optional[List[int]] = field(default=None, metadata={"argparse": {
        "nargs": 3, "metavar": ("START", "INCREMENT", "SAMPLES")}})
    """`ramp` rule: START INCREMENT SAMPLES, Megatron semantics: start at START and add
    INCREMENT every SAMPLES / ((max - START) / INCREMENT) consumed samples."""

    lr_scaling: str = field(default="none", metadata={"argparse": {"choices": LR_SCALING_RULES}})
    """LR scale relative to the initial global batch: none, sqrt, linear (Goyal et al.
    2017) or adascale (gain ratio r, Johnson et al. 2020; needs the noise scale). AdaScale
    also runs the LR schedule and the --train-samples budget on its scale-invariant clock,
    which a step advances by r initial batches, so a run reads more samples than
    --train-samples once the batch outgrows the noise scale (at most x max/initial batch)."""

    topology: str = "auto"
    """Cluster for the step-time model: `auto` (detect) or a spec such as
    `nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB`."""

    mfu_assumed: float = 0.45
    """Model-FLOPs utilisation assumed by the step-time model before measurements."""

    def __post_init__(self):
        if self.batch_growth not in GROWTH_RULES:
            raise ValueError(
                f"--batch-growth={self.batch_growth!r} is not one of {GROWTH_RULES}")
        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(
                f"--lr-scaling={self.lr_scaling!r} is not one of {LR_SCALING_RULES}")
        for name in ("batch_growth_min", "batch_growth_max"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive global "
                                 f"batch (samples), got {v}")
        if (self.batch_growth_min is not None and self.batch_growth_max is not None
                and self.batch_growth_max < self.batch_growth_min):
            raise ValueError(
                f"--batch-growth-max ({self.batch_growth_max}) is below --batch-growth-min "
                f"({self.batch_growth_min}); raise the max or lower the min")
        if self.batch_growth == "off" and self.lr_scaling != "none":
            raise ValueError(f"--lr-scaling {self.lr_scaling} rescales the LR when the batch "
                             "grows: add --batch-growth (ramp, gns or goodput) or drop it")
        if self.batch_growth != "off" and self.batch_growth_max is None:
            raise ValueError(
                f"--batch-growth={self.batch_growth} needs an upper bound: set "
                "--batch-growth-max (for `ramp` it is the final global batch)")
        if self.batch_growth_interval < 1:
            raise ValueError("--batch-growth-interval must be >= 1 optimizer step")
        if self.batch_growth_interval_tokens is not None and self.batch_growth_interval_tokens < 1:
            raise ValueError("--batch-growth-interval-tokens must be >= 1 (or leave unset)")
        if not self.batch_growth_k > 0:
            raise ValueError(f"--batch-growth-k must be > 0, got {self.batch_growth_k}")
        if not self.batch_growth_threshold >= 1.0:
            raise ValueError(
                f"--batch-growth-threshold must be >= 1.0 (a gain ratio; 1.1 = grow only "
                f"for >= 10% predicted gain), got {self.batch_growth_threshold}")
        if self.batch_growth_min_steps < 0:
            raise ValueError("--batch-growth-min-steps must be >= 0")
        if not 0.0 <= self.batch_growth_step_time_ema < 1.0:
            raise ValueError("--batch-growth-step-time-ema must be in [0, 1)")
        if not 0.0 < self.mfu_assumed <= 1.0:
            raise ValueError(
                f"--mfu-assumed must be in (0, 1] (typical 0.3-0.55), got {self.mfu_assumed}")
        if self.batch_growth == "ramp":
            self._check_ramp()
        elif self.rampup_batch_size is not None and self.batch_growth != "off":
            raise ValueError(
                f"--rampup-batch-size is only used by --batch-growth=ramp; drop it or switch "
                f"rule (got --batch-growth={self.batch_growth})")

    def _check_ramp(self):
        r = self.rampup_batch_size
        if r is None or len(r) != 3:
            raise ValueError("--batch-growth=ramp needs --rampup-batch-size START INCREMENT "
                             "SAMPLES (three integers)")
        start, inc, samples = (int(x) for x in r)
        if start <= 0 or inc <= 0 or samples <= 0:
            raise ValueError(f"--rampup-batch-size values must be positive, got {r}")
        if start > self.batch_growth_max:
            raise ValueError(f"--rampup-batch-size START ({start}) exceeds --batch-growth-max "
                             f"({self.batch_growth_max}); lower START or raise the max")
        if (self.batch_growth_max - start) % inc:
            raise ValueError(f"--rampup-batch-size: --batch-growth-max - START "
                             f"({self.batch_growth_max - start}) must be a multiple of INCREMENT "
                             f"({inc}), as in Megatron's ramp; adjust one of them")

    def validate_against(self, gns_enabled: bool) -> None:
        """Cross-check with the gradient-noise-scale config (separate feature).

        `gns` and `goodput` read B_simple and `adascale` needs the noise statistics, so they
        require the noise-scale measurement to be on.
        """
        needs = []
        if self.batch_growth in ("gns", "goodput"):
            needs.append(f"--batch-growth={self.batch_growth}")
        if self.lr_scaling == "adascale":
            needs.append("--lr-scaling=adascale")
        if needs and not gns_enabled:
            raise ValueError(f"{' and '.join(needs)} read the gradient noise scale B_simple; "
                             "enable the measurement with --gns (or use --batch-growth=ramp / "
                             "--lr-scaling=sqrt|linear)")

    def bounds(self, initial_global_batch: int):
        """(min, max) global batch with the defaults resolved."""
        lo = self.batch_growth_min if self.batch_growth_min is not None else initial_global_batch
        hi = self.batch_growth_max
        if hi is None:
            hi = max(lo, initial_global_batch)
        return lo, hi


def add_batch_growth_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "dynamic global batch" argparse group; flags map 1:1 to config fields.

    `--rampup-batch-size` is skipped if the parser already has it (Megatron's own parser
    defines it with the same meaning), so both can be combined.
    """
    skip = ["rampup_batch_size"] if "--rampup-batch-size" in parser._option_string_actions else []
    return BatchGrowthConfig.add_args(parser, skip=skip)
