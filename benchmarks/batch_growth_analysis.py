"""Analysis of ``bench_batch_growth.py``'s runs (pure Python + numpy; matplotlib for plots).

Main API: ``analyse(runs, cfg, out_dir) -> summary dict`` (also writes ``summary.md`` and
``plots_<schedule>.png``).

Loss measure: the mean training loss over a window of ``cfg["window"]`` samples centred on a
fixed grid of sample counts (each step's loss weighted by how many of its samples fall in the
window), so every run is averaged over the same number of samples whatever its batch; and
the loss on the fixed validation set at fixed sample counts.

Frontier: per schedule, seed and target, every fixed batch B at its best LR gives (steps S_B,
samples E_B = samples consumed when the window centred there first reaches the target). A
least-squares fit of S = S_min + E_min / B (McCandlish et al. 2018, eq. 2.11 in the form
(S/S_min - 1)(E/E_min - 1) = 1) gives the fewest steps a fixed batch needs for E samples:
S_front(E) = S_min * E / (E - E_min). A run's steps saved at equal samples is
1 - S_run / S_front(E_run); None when E_run <= E_min (no fixed batch reaches the target with
so few samples: the run is beyond the frontier on samples too).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

TARGET_FRACTIONS = (0.3, 0.5, 0.7, 0.9)


def load(run: dict) -> dict:
    rows = [json.loads(l) for l in Path(run["log"]).read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "lm_loss" in r]
    ev = json.loads(Path(run["evals"]).read_text())
    return dict(samples=np.array([r["consumed_samples"] for r in steps], float),
                batch=np.array([r["global_batch_size"] for r in steps], float),
                loss=np.array([r["lm_loss"] for r in steps], float),
                b_simple=np.array([r.get("b_simple", float("nan")) for r in steps], float),
                evals=ev["evals"], wall_s=ev["wall_s"])


def grid(cfg: dict) -> np.ndarray:
    w = cfg["window"]
    return np.arange(w / 2, cfg["samples"] - w / 2 + 1e-9, max(1, w // 4))


def windowed_loss(d: dict, centres: np.ndarray, window: int) -> np.ndarray:
    """Mean per-sample loss over [c - w/2, c + w/2] for every centre c."""
    hi = d["samples"]
    lo = hi - d["batch"]
    out = np.empty(len(centres))
    for j, c in enumerate(centres):
        a, b = c - window / 2, c + window / 2
        overlap = np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None)
        out[j] = float((overlap * d["loss"]).sum() / overlap.sum())
    return out


def steps_at(d: dict, sample: float) -> int:
    """Optimizer steps needed to consume ``sample`` samples."""
    return int(np.searchsorted(d["samples"], sample) + 1)


def reach(d: dict, curve: np.ndarray, centres: np.ndarray, target: float) -> Optional[dict]:
    hit = np.nonzero(curve <= target)[0]
    if not len(hit):
        return None
    s = float(centres[hit[0]])
    return dict(samples=s, steps=steps_at(d, s))


def fit_frontier(points: List[tuple]) -> Optional[dict]:
    """Least squares S = S_min + E_min / B over (B, S) points (>= 2 distinct B)."""
    if len({b for b, _ in points}) < 2:
        return None
    x = np.array([1.0 / b for b, _ in points])
    y = np.array([s for _, s in points], float)
    e_min, s_min = np.polyfit(x, y, 1)
    if s_min <= 0 or e_min <= 0:
        return dict(s_min=float(s_min), e_min=float(e_min), ok=False, n=len(points))
    return dict(s_min=float(s_min), e_min=float(e_min), ok=True, n=len(points),
                b_crit=float(e_min / s_min))


def steps_saved(front: Optional[dict], r: Optional[dict]) -> Optional[float]:
    if front is None or not front["ok"] or r is None or r["samples"] <= front["e_min"]:
        return None
    s_front = front["s_min"] * r["samples"] / (r["samples"] - front["e_min"])
    return 1.0 - r["steps"] / s_front


def _ms(values) -> Optional[dict]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    return dict(mean=float(np.mean(v)), sd=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                n=len(v), n_total=len(values))


def analyse(runs: List[dict], cfg: dict, out: Path) -> dict:
    centres = grid(cfg)
    for r in runs:
        r["data"] = load(r)
        r["curve"] = windowed_loss(r["data"], centres, cfg["window"])
        r["final_window"] = float(r["curve"][-1])
        ev = [e["loss"] for e in r["data"]["evals"] if e["loss"] is not None]
        r["final_valid"] = ev[-1] if ev else None
    summary: Dict[str, dict] = {}
    md = []
    for sched in cfg["schedules"]:
        summary[sched] = _analyse_schedule([r for r in runs if r["schedule"] == sched], cfg,
                                           centres, sched, md)
        _plot(sched, [r for r in runs if r["schedule"] == sched], centres, summary[sched], out)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    for r in runs:
        r.pop("data"), r.pop("curve")
    summary["runs"] = [{k: v for k, v in r.items() if k not in ("argv",)} for r in runs]
    return summary


def _analyse_schedule(runs, cfg, centres, sched, md) -> dict:
    labels = sorted({r["label"] for r in runs}, key=lambda l: (l.split("-")[0], len(l), l))
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["label"], r["seed"]): r for r in runs}
    fixed = [l for l in labels if l.startswith("fixed-")]
    # Targets: the best fixed configuration's (lowest mean final window loss) curve, mean
    # over seeds, at fixed fractions of the grid.
    best = min(fixed, key=lambda l: np.mean([by[(l, s)]["final_window"] for s in seeds]))
    mean_curve = np.mean([by[(best, s)]["curve"] for s in seeds], axis=0)
    targets = [float(mean_curve[int(f * (len(centres) - 1))]) for f in TARGET_FRACTIONS]
    res = dict(best_fixed=best, targets=targets, frontier={}, rules={})
    for ti, t in enumerate(targets):
        for s in seeds:
            for r in (by[(l, s)] for l in labels):
                r.setdefault("reach", {})[ti] = reach(r["data"], r["curve"], centres, t)
            pts = []
            for b in cfg["fixed"]:
                hits = [by[(l, s)]["reach"][ti] for l in fixed if l.startswith(f"fixed-{b}-")]
                hits = [h for h in hits if h is not None]
                if hits:
                    pts.append((b, min(h["steps"] for h in hits)))
            res["frontier"][f"{ti}/s{s}"] = fit_frontier(pts)
    for l in labels:
        row = dict(final_window=_ms([by[(l, s)]["final_window"] for s in seeds]),
                   final_valid=_ms([by[(l, s)]["final_valid"] for s in seeds]),
                   wall_s=_ms([by[(l, s)]["data"]["wall_s"] for s in seeds]), targets=[])
        for ti in range(len(targets)):
            hits = [by[(l, s)]["reach"][ti] for s in seeds]
            saved = [steps_saved(res["frontier"][f"{ti}/s{s}"], h) for s, h in zip(seeds, hits)]
            row["targets"].append(dict(
                steps=_ms([h["steps"] if h else None for h in hits]),
                samples=_ms([h["samples"] if h else None for h in hits]),
                steps_saved=_ms(saved),
                beyond_frontier=sum(1 for h, s in zip(hits, seeds) if h and saved[seeds.index(s)]
                                    is None and res["frontier"][f"{ti}/s{s}"] is not None)))
        res["rules"][l] = row
    res["verdict"] = _verdict(res, labels)
    _markdown(sched, res, labels, md)
    return res


def _verdict(res, labels) -> dict:
    gns = res["rules"].get("gns")
    if gns is None:
        return {}
    saved = [t["steps_saved"]["mean"] if t["steps_saved"] else None for t in gns["targets"]]
    out = dict(gns_steps_saved=saved,
               gns_saves_25pct_every_target=all(s is not None and s >= 0.25 for s in saved))
    dominated_by = []
    for l in (l for l in labels if l.startswith("ramp")):
        r = res["rules"][l]
        fv = lambda x: x["final_valid"]["mean"] if x["final_valid"] else math.inf  # noqa: E731
        for ti, (tg, tr) in enumerate(zip(gns["targets"], r["targets"])):
            if tr["steps"] and (not tg["steps"] or tr["steps"]["mean"] < tg["steps"]["mean"]) \
                    and fv(r) < fv(gns):
                dominated_by.append(dict(ramp=l, target=ti))
    out["ramps_beating_gns_on_steps_and_final_loss"] = dominated_by
    return out


def _fmt(m, pct=False, digits=0):
    if m is None:
        return "n/r"
    if pct:
        return f"{100 * m['mean']:+.0f}±{100 * m['sd']:.0f}%" + ("" if m["n"] == m["n_total"]
                                                                  else f" ({m['n']}/{m['n_total']})")
    return f"{m['mean']:.{digits}f}±{m['sd']:.{digits}f}"


def _markdown(sched, res, labels, md) -> None:
    md.append(f"### schedule: {sched}")
    md.append(f"targets (window loss of {res['best_fixed']} at "
              f"{', '.join(f'{f:.0%}' for f in TARGET_FRACTIONS)} of the budget): "
              + ", ".join(f"{t:.3f}" for t in res["targets"]))
    md.append("")
    head = "| run | final window loss | final valid loss |" + "".join(
        f" T{i} steps | T{i} samples | T{i} saved |" for i in range(len(res["targets"])))
    md.append(head)
    md.append("|---" * (3 + 3 * len(res["targets"])) + "|")
    for l in labels:
        r = res["rules"][l]
        cells = [l, _fmt(r["final_window"], digits=3), _fmt(r["final_valid"], digits=3)]
        for t in r["targets"]:
            cells += [_fmt(t["steps"]), _fmt(t["samples"]), _fmt(t["steps_saved"], pct=True)]
        md.append("| " + " | ".join(cells) + " |")
    fr = [f"T{k.split('/')[0]} {k.split('/')[1]}: " + (
        f"S_min {v['s_min']:.0f}, E_min {v['e_min']:.0f}, B_crit {v.get('b_crit', float('nan')):.1f}"
        + ("" if v["ok"] else " (bad fit)") if v else "no fit") for k, v in res["frontier"].items()]
    md.append("")
    md.append("frontier fits: " + "; ".join(fr))
    md.append(f"verdict: {json.dumps(res['verdict'])}")
    md.append("")


def _plot(sched, runs, centres, res, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    seed = min(r["seed"] for r in runs)
    best_lr = {}
    for r in runs:  # per fixed batch, the LR with the lowest final loss (this seed)
        if r["group"] == "fixed" and r["seed"] == seed:
            b = r["batch"]
            if b not in best_lr or r["final_window"] < best_lr[b]["final_window"]:
                best_lr[b] = r
    shown = list(best_lr.values()) + [r for r in runs if r["group"] != "fixed" and r["seed"] == seed]
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    for a in ax.flat:  # (more runs than the default 10 colours)
        a.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))
    for r in shown:
        d = r["data"]
        line, = ax[0, 0].plot(centres, r["curve"], label=r["label"],
                              ls="--" if r["group"] == "fixed" else "-")
        color = line.get_color()
        ax[0, 1].plot([steps_at(d, c) for c in centres], r["curve"], color=color,
                      ls=line.get_linestyle())
        if r["group"] != "fixed":
            ax[1, 0].plot(d["samples"], d["batch"], color=color, label=f"{r['label']} batch")
            if r["group"] in ("gns", "goodput", "variant"):
                ax[1, 0].plot(d["samples"], d["b_simple"], ":", color=color,
                              label=f"{r['label']} B_simple")
        for ti, h in r.get("reach", {}).items():
            if h:
                ax[1, 1].scatter(h["samples"], h["steps"], s=14, color=color,
                                 marker="o" if r["group"] == "fixed" else "*")
    for ti in range(len(res["targets"])):
        f = res["frontier"].get(f"{ti}/s{seed}")
        if f and f["ok"]:
            e = np.linspace(f["e_min"] * 1.05, centres[-1] * 1.5, 100)
            ax[1, 1].plot(e, f["s_min"] * e / (e - f["e_min"]), "k-", lw=0.7)
    for t in res["targets"]:
        ax[0, 0].axhline(t, color="grey", lw=0.5)
    ax[0, 0].set(xlabel="samples", ylabel="window loss", title=f"{sched}, seed {seed}")
    ax[0, 1].set(xlabel="steps", ylabel="window loss", xscale="log")
    ax[1, 0].set(xlabel="samples", ylabel="global batch / B_simple", yscale="log")
    ax[1, 1].set(xlabel="samples to target", ylabel="steps to target", xscale="log",
                 yscale="log", title="targets reached (dots fixed, stars growth); frontier")
    ax[0, 0].legend(fontsize=6), ax[1, 0].legend(fontsize=6)
    ax[0, 0].text(0.01, 0.01, "fixed batches at their best LR (dashed)", fontsize=6,
                  transform=ax[0, 0].transAxes)
    fig.tight_layout()
    fig.savefig(out / f"plots_{sched}.png", dpi=100)
    plt.close(fig)
