"""Configuration of the gradient-noise-scale (GNS) measurement.

Main API: `GNSConfig` (one dataclass, fields map 1:1 to flags),
`add_gns_args(parser)` (argparse group "gradient noise scale") and
`GNSConfig.from_args(args)`. Flag `--foo-bar` maps to field `foo_bar`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional

GNS_ESTIMATORS = ("per-sample", "data-parallel")


@dataclass
class GNSConfig:
    """Measurement of B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018)."""

    gns: bool = False
    """Measure the gradient noise scale during training (off by default)."""

    gns_estimator: str = "per-sample"
    """`per-sample`: per-sample gradient norms |g_i|^2 of every sample in the global batch
    (exact unbiased estimator, needs the fused per-sample-norm kernel); `data-parallel`:
    the two-batch-size estimator of McCandlish et al. App. A.1 with the per-data-parallel-rank
    gradient as the small batch and the all-reduced gradient as the big batch (free, but
    needs data-parallel size >= 2)."""

    gns_ema_decay: float = 0.95
    """Decay of the bias-corrected EMAs of tr(Sigma) and |G|^2; B_simple is their ratio.
    Closer to 1 = smoother but slower to follow changes of the noise scale."""

    gns_measure_interval: int = 1
    """Measure on every this-many-th optimizer step only; the other steps run megatron-core's
    own weight-gradient path, so the measuring overhead is divided by it. The EMAs then see
    one step in N: lower --gns-ema-decay (e.g. 0.95 -> 0.95**N) to keep their time constant."""

    gns_log_interval: int = 1
    """Log B_simple (and the raw/EMA tr(Sigma), |G|^2) every this many optimizer steps."""

    gns_plot: Optional[str] = None
    """If set, path of a PNG of B_simple vs consumed tokens written at the end of training."""

    gns_include_embedding: bool = False
    """Include the word-embedding (and untied output-layer) gradients in the norms. Off by
    default: the embedding gradient is very sparse (only the rows of tokens in the batch)
    and its per-sample norm is expensive and dominated by rare-token noise."""

    def __post_init__(self):
        if self.gns_estimator not in GNS_ESTIMATORS:
            raise ValueError(
                f"--gns-estimator={self.gns_estimator!r} is not one of {GNS_ESTIMATORS}; "
                "use per-sample (needs per-sample gradient norms) or data-parallel "
                "(needs data-parallel size >= 2)")
        if not (isinstance(self.gns_ema_decay, (int, float)) and 0.0 < self.gns_ema_decay < 1.0):
            raise ValueError(
                f"--gns-ema-decay must be in the open interval (0, 1) (typical 0.9-0.99), "
                f"got {self.gns_ema_decay}")
        if not isinstance(self.gns_measure_interval, int) or self.gns_measure_interval < 1:
            raise ValueError(
                f"--gns-measure-interval must be an integer >= 1 optimizer step (1 = every "
                f"step), got {self.gns_measure_interval}")
        if not isinstance(self.gns_log_interval, int) or self.gns_log_interval < 1:
            raise ValueError(
                f"--gns-log-interval must be an integer >= 1 optimizer step, "
                f"got {self.gns_log_interval}")
        if self.gns_plot is not None and not str(self.gns_plot).strip():
            raise ValueError("--gns-plot must be a file path (e.g. gns.png) or be left unset")
        if self.gns_plot is not None and not str(self.gns_plot).lower().endswith(".png"):
            raise ValueError(
                f"--gns-plot writes a PNG; give a path ending in .png, got {self.gns_plot!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GNSConfig":
        kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**kw)


def add_gns_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "gradient noise scale" argparse group; flags map 1:1 to config fields."""
    d = GNSConfig()
    g = parser.add_argument_group("gradient noise scale")
    g.add_argument("--gns", action="store_true", default=d.gns,
                   help="measure the gradient noise scale B_simple during training")
    g.add_argument("--gns-estimator", choices=GNS_ESTIMATORS, default=d.gns_estimator,
                   help="per-sample gradient norms or the two-batch data-parallel estimator")
    g.add_argument("--gns-ema-decay", type=float, default=d.gns_ema_decay,
                   help="decay of the EMAs of tr(Sigma) and |G|^2, in (0, 1)")
    g.add_argument("--gns-measure-interval", type=int, default=d.gns_measure_interval,
                   help="measure on every N-th optimizer step only (overhead / N)")
    g.add_argument("--gns-log-interval", type=int, default=d.gns_log_interval,
                   help="log the noise scale every N optimizer steps")
    g.add_argument("--gns-plot", type=str, default=d.gns_plot,
                   help="write a PNG of B_simple vs tokens to this path at the end")
    g.add_argument("--gns-include-embedding", action="store_true",
                   default=d.gns_include_embedding,
                   help="include embedding/output-layer gradients in the norms")
    return parser
