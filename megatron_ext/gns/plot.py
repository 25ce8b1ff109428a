"""Plots of the gradient noise scale.

Main API: `plot_dashboard(gns_history, steps, path)` (`--gns-plot`: the growth dashboard),
`plot_gns_history(history, path)` (B_simple alone), `growth_events(steps)`.

The dashboard puts on one picture, against consumed tokens: B_simple as measured (raw, per
step) and smoothed (the ratio of EMAs the controller reads), the global batch it drives as a
step line, the learning rate and the training loss; every batch growth is a vertical line
through all panels, so "the batch jumped at an LR of 1e-6" is visible at a glance.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


def plot_gns_history(history: list, path, title: Optional[str] = None) -> bool:
    """Write a PNG of B_simple vs tokens from a list of `GNSMeasurement.to_dict()` dicts.

    Entries need `tokens` and `b_simple` keys; entries with a missing/non-finite B_simple are
    dropped. Returns True if a file was written, False if skipped (no matplotlib, no data).
    """
    points = [(d["tokens"], d["b_simple"]) for d in history
              if d.get("b_simple") is not None and math.isfinite(d["b_simple"])
              and d.get("tokens") is not None]
    if not points:
        logger.warning("GNS plot skipped: no valid B_simple measurements")
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: training nodes have no display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("GNS plot skipped: matplotlib is not installed")
        return False
    xs, ys = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, lw=1.2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("B_simple (samples)")
    if min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_title(title or "Gradient noise scale B_simple = tr(Sigma)/|G|^2")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return True


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: training nodes have no display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("GNS plot skipped: matplotlib is not installed")
        return None
    return plt


def _finite(d: Dict, key: str) -> bool:
    v = d.get(key)
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def growth_events(steps: Sequence[Dict]) -> List[Dict]:
    """``[{tokens, iteration, old, new}]`` where ``global_batch_size`` changes between
    consecutive progress records (at the resolution of --log-interval)."""
    events = []
    for prev, cur in zip(steps, steps[1:]):
        if cur.get("global_batch_size") != prev.get("global_batch_size"):
            events.append({"tokens": prev.get("tokens"), "iteration": prev.get("iteration"),
                           "old": prev.get("global_batch_size"),
                           "new": cur.get("global_batch_size")})
    return events


def _series(rows: Sequence[Dict], key: str):
    pts = [(r["tokens"], r[key]) for r in rows if _finite(r, key) and _finite(r, "tokens")]
    return tuple(zip(*pts)) if pts else ((), ())


def _noise_panel(ax, gns_history: Sequence[Dict], steps: Sequence[Dict]) -> None:
    x, raw = _series(gns_history, "b_simple_raw")
    if x:
        ax.plot(x, raw, ".", ms=2, alpha=0.35, color="tab:blue", label="B_simple (raw, per step)")
    x, ema = _series(gns_history, "b_simple")
    if x:
        ax.plot(x, ema, lw=1.5, color="tab:blue", label="B_simple (smoothed: ratio of EMAs)")
    x, batch = _series(steps, "global_batch_size")
    if x:
        ax.step(x, batch, where="post", lw=2, color="tab:red", label="global batch")
    values = [v for v in (*ema, *batch) if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("samples")
    ax.legend(loc="lower right", fontsize=8)  # B_simple and the batch rise to the right
    ax.set_title("Gradient noise scale and the global batch it drives", fontsize=10)


def plot_dashboard(gns_history: Sequence[Dict], steps: Sequence[Dict], path,
                   title: Optional[str] = None) -> bool:
    """Write the growth dashboard PNG: B_simple (raw and smoothed) with the global batch,
    the LR, and the loss against tokens, growth events marked. ``gns_history``:
    `GNSMeasurement.to_dict()` dicts; ``steps``: progress records (``tokens``,
    ``global_batch_size``, ``lr``, ``lm_loss``; e.g. `--log-json` lines). True if written."""
    if not any(_finite(d, "b_simple") for d in gns_history) and not steps:
        logger.warning("GNS dashboard skipped: no measurements and no progress records")
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1, 1]})
    _noise_panel(axes[0], gns_history, steps)
    for ax, key, label in ((axes[1], "lr", "learning rate"), (axes[2], "lm_loss", "loss")):
        x, y = _series(steps, key)
        if x:
            ax.plot(x, y, lw=1.2, color="black" if key == "lm_loss" else "tab:green")
        ax.set_ylabel(label)
    for event in growth_events(steps):
        for ax in axes:
            ax.axvline(event["tokens"], color="tab:red", ls="--", lw=0.8, alpha=0.6)
        axes[0].annotate(f"{event['old']}->{event['new']}", (event["tokens"], 1.0),
                         xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                         va="top", ha="right", color="tab:red")
    axes[-1].set_xlabel("tokens")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)
    return True
