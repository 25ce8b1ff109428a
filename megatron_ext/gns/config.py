"""Configuration of the gradient-noise-scale (GNS) measurement.

Main API: `GNSConfig` (one dataclass, fields map 1:1 to flags),
`add_gns_args(parser)` (argparse group "gradient noise scale") and
`GNSConfig.from_args(args)`. Flag `--foo-bar` maps to field `foo_bar`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.config_flags import FlagConfig

GNS_ESTIMATORS = ("per-sample", "data-parallel")
GNS_ROUTE_CHOICES = ("auto", "fused", "ghost", "batched")  # "auto" + gns.routes.ROUTES


@dataclass
class GNSConfig(FlagConfig):
    """Measurement of B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018)."""

    flag_group = "gradient noise scale"

    gns: bool = False
    """Measure the gradient noise scale during training (off by default)."""

    gns_estimator: str = field(default="per-sample",
                               metadata={"argparse": {"choices": GNS_ESTIMATORS}})
    """`per-sample`: per-sample gradient norms |g_i|^2 of every sample in the global batch
    (exact unbiased estimator, needs the fused per-sample-norm kernel); `data-parallel`:
    the two-batch-size estimator of McCandlish et al. App. A.1 with the per-data-parallel-rank
    gradient as the small batch and the all-reduced gradient as the big batch (free, but
    needs data-parallel size >= 2)."""

    gns_ema_decay: float = 0.95
    """Decay of the bias-corrected EMAs of tr(Sigma) and |G|^2; B_simple is their ratio.
    Closer to 1 = smoother but slower to follow changes of the noise scale."""

    gns_ema_tokens: Optional[int] = None
    """If set, the EMAs' memory in tokens instead of steps: an update covering dT new tokens
    decays them by exp(-dT / this), so the memory does not grow with the batch (and needs no
    retuning with --gns-measure-interval). --gns-ema-decay is then unused."""

    gns_measure_interval: int = 1
    """Measure on every this-many-th optimizer step only; the other steps run megatron-core's
    own weight-gradient path, so the measuring overhead is divided by it. The EMAs then see
    one step in N: lower --gns-ema-decay (e.g. 0.95 -> 0.95**N) to keep their time constant."""

    gns_log_interval: Optional[int] = None
    """Log B_simple (and the raw/EMA tr(Sigma), |G|^2) every this many optimizer steps
    (default: --log-interval)."""

    gns_plot: Optional[str] = None
    """If set, path of a PNG of B_simple vs consumed tokens written at the end of training."""

    gns_include_embedding: bool = False
    """Include the word-embedding (and untied output-layer) gradients in the norms. Off by
    default: the embedding gradient is very sparse (only the rows of tokens in the batch)
    and its per-sample norm is expensive and dominated by rare-token noise."""

    gns_route: str = field(default="auto", metadata={"argparse": {"choices": GNS_ROUTE_CHOICES}})
    """How each GNS linear gets dW and per-sample |dW_i|^2: `fused` (the Triton kernel, one
    pass), `ghost` (torch dW + norms from two [T, T] Gram matrices per sample), `batched`
    (torch dW + a per-sample product), or `auto`: on a GPU the fastest, timed once per layer
    shape at startup (cached under $MEGATRON_EXT_CACHE_DIR, default ~/.cache/megatron_ext);
    on CPU a FLOP/memory rule. The startup line lists the route of every shape."""

    def __post_init__(self):
        if self.gns_estimator not in GNS_ESTIMATORS:
            raise ValueError(
                f"--gns-estimator={self.gns_estimator!r} is not one of {GNS_ESTIMATORS}; "
                "use per-sample (needs per-sample gradient norms) or data-parallel "
                "(needs data-parallel size >= 2)")
        if self.gns_route not in GNS_ROUTE_CHOICES:
            raise ValueError(f"--gns-route={self.gns_route!r} is not one of {GNS_ROUTE_CHOICES}; "
                             "use auto (fastest per layer shape) or force fused, ghost or batched")
        if not (isinstance(self.gns_ema_decay, (int, float)) and 0.0 < self.gns_ema_decay < 1.0):
            raise ValueError(
                f"--gns-ema-decay must be in the open interval (0, 1) (typical 0.9-0.99), "
                f"got {self.gns_ema_decay}")
        if self.gns_ema_tokens is not None and self.gns_ema_tokens < 1:
            raise ValueError(f"--gns-ema-tokens must be >= 1 token (e.g. 20 x the tokens of "
                             f"one step), got {self.gns_ema_tokens}")
        if not isinstance(self.gns_measure_interval, int) or self.gns_measure_interval < 1:
            raise ValueError(
                f"--gns-measure-interval must be an integer >= 1 optimizer step (1 = every "
                f"step), got {self.gns_measure_interval}")
        if self.gns_log_interval is not None and (not isinstance(self.gns_log_interval, int)
                                                  or self.gns_log_interval < 1):
            raise ValueError(
                f"--gns-log-interval must be an integer >= 1 optimizer step, "
                f"got {self.gns_log_interval}")
        if self.gns_plot is not None and not str(self.gns_plot).strip():
            raise ValueError("--gns-plot must be a file path (e.g. gns.png) or be left unset")
        if self.gns_plot is not None and not str(self.gns_plot).lower().endswith(".png"):
            raise ValueError(
                f"--gns-plot writes a PNG; give a path ending in .png, got {self.gns_plot!r}")


def include_embedding_problem(tied: bool, pipeline_parallel_size: int,
                              position_embedding_type: str) -> Optional[str]:
    """Why ``--gns-include-embedding`` cannot measure this GPT exactly, or None if it can
    (asked by the job's validation and again by ``GNSGPTModel`` for direct library use)."""
    if tied and pipeline_parallel_size > 1:
        return ("--gns-include-embedding with tied embeddings needs PP=1 (the cross term "
                "spans two stages): add --untie-embeddings-and-output-weights or drop "
                "--gns-include-embedding")
    if position_embedding_type == "learned_absolute":
        return ("--gns-include-embedding supports --position-embedding-type rope only (learned "
                "absolute positions are not covered)")
    return None


def add_gns_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "gradient noise scale" argparse group; flags map 1:1 to :class:`GNSConfig` fields."""
    return GNSConfig.add_args(parser)
