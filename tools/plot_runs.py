"""Overlay several training runs from their ``--log-json`` files in one PNG.

    python tools/plot_runs.py fixed.jsonl growth.jsonl --labels fixed growth --out runs.png

Panels: loss vs samples, loss vs steps, global batch vs samples, B_simple vs samples (the
smoothed value of the progress lines, or the GNS lines' ``gns/b_simple``). Comparing runs by
samples is what matters when one grows its batch: at the same step it has seen more data.
Main API: :func:`read_run`, :func:`plot_runs`, :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

PANELS = (("consumed_samples", "lm_loss", "loss vs samples"),
          ("iteration", "lm_loss", "loss vs steps"),
          ("consumed_samples", "global_batch_size", "global batch vs samples"),
          ("consumed_samples", "b_simple", "B_simple vs samples"))


def read_run(path: str) -> List[Dict[str, float]]:
    """The progress records of a ``--log-json`` file (one per logged step, by iteration),
    with ``b_simple`` filled from the GNS lines of the same iteration when missing."""
    steps: Dict[int, Dict[str, float]] = {}
    gns: Dict[int, float] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            it = row.get("iteration")
            if it is None:
                continue
            if "lm_loss" in row:
                steps[it] = row
            elif "gns/b_simple" in row:
                gns[it] = row["gns/b_simple"]
    for it, row in steps.items():
        if "b_simple" not in row and it in gns:
            row["b_simple"] = gns[it]
    return [steps[it] for it in sorted(steps)]


def _xy(rows: Sequence[Dict], xkey: str, ykey: str):
    pts = [(r[xkey], r[ykey]) for r in rows if isinstance(r.get(ykey), (int, float))
           and math.isfinite(r[ykey]) and r.get(xkey) is not None]
    return tuple(zip(*pts)) if pts else ((), ())


def plot_runs(runs: Dict[str, Sequence[Dict]], out: str) -> None:
    """One 2 x 2 figure of ``{label: records}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (xkey, ykey, title) in zip(axes.flat, PANELS):
        for label, rows in runs.items():
            x, y = _xy(rows, xkey, ykey)
            if not x:
                continue
            if ykey == "global_batch_size":
                ax.step(x, y, where="post", label=label)
            else:
                ax.plot(x, y, lw=1.0, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("samples" if xkey == "consumed_samples" else "steps")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", help="--log-json files of the runs")
    p.add_argument("--labels", nargs="+", help="one name per run (default: file names)")
    p.add_argument("--out", default="runs.png", help="PNG to write")
    args = p.parse_args(argv)
    labels = args.labels or [os.path.splitext(os.path.basename(x))[0] for x in args.logs]
    if len(labels) != len(args.logs):
        p.error(f"--labels: {len(labels)} names for {len(args.logs)} logs")
    runs = {}
    for label, path in zip(labels, args.logs):
        if not os.path.isfile(path):
            p.error(f"{path}: no such file (a --log-json file of a run)")
        runs[label] = read_run(path)
        if not runs[label]:
            p.error(f"{path}: no progress records (lines with lm_loss)")
    try:
        plot_runs(runs, args.out)
    except ImportError:
        p.error("needs matplotlib: pip install 'megatron_ext[logging]'")
    print(f"wrote {args.out} ({', '.join(f'{k}: {len(v)} steps' for k, v in runs.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
