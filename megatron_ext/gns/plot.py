"""Plot of the gradient noise scale. Main API: `plot_gns_history(history, path)`."""
from __future__ import annotations

import logging
import math
from typing import Optional

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
