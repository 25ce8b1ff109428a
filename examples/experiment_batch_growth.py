"""Experiment: dynamic global batch vs fixed batches at an equal sample (token) budget.

Superseded by ``benchmarks/bench_batch_growth.py`` (issue 13): this script's verdict is a
single-seed first crossing of a 5-step moving average against one target, which flips with
the seed; use the benchmark to decide anything. It stays only because
``benchmarks/gpu_suite.sh growth`` passes GPU model flags through it.

Main API: ``python examples/experiment_batch_growth.py --out-dir runs/growth [pretrain flags...]``

Runs ``examples/pretrain_gpt.py`` once per fixed global batch in ``--fixed-batches`` and once
with ``--gns --batch-growth <rule>``, all with the same model, data, seed and
``--train-samples``. The best fixed run is the one with the lowest final loss (mean of the
last ``--final-window`` logged losses). For every run it reports optimizer steps and wall
time until its smoothed loss first reaches that final loss, writes ``results.md``,
``results.json`` and ``curves.png`` (loss vs tokens and vs wall time) into ``--out-dir``.
Issue 6's target: the growth run needs >= 25% fewer steps and >= 10% less time.

Any flag this script does not know is passed through to every run, e.g. ``--num-layers 8``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

SCRIPT = Path(__file__).resolve().parent / "pretrain_gpt.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--nproc", type=int, default=1, help="torchrun --nproc_per_node")
    p.add_argument("--train-samples", type=int, default=4096)
    p.add_argument("--fixed-batches", default="8,32", help="comma list of fixed global batches")
    p.add_argument("--initial-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--growth-rule", choices=["gns", "goodput", "ramp"], default="gns")
    p.add_argument("--growth-args", default="--batch-growth-interval 10 --batch-growth-min-steps 10",
                   help="extra flags for the growth run")
    p.add_argument("--lr-scaling", default="sqrt")
    p.add_argument("--final-window", type=int, default=5)
    p.add_argument("--smooth", type=int, default=5, help="moving-average window of the loss")
    return p.parse_known_args(argv)


def run(name: str, nproc: int, flags: List[str], out_dir: Path) -> List[Dict]:
    log = out_dir / f"{name}.jsonl"
    if log.exists():
        log.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           str(SCRIPT), *flags, "--log-json", str(log), "--log-interval", "1"]
    print(f"> {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=open(out_dir / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: see {out_dir / (name + '.log')}")
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "lm_loss" in r]
    print(f"  {len(rows)} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def smoothed(values: List[float], window: int) -> List[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def reach(rows: List[Dict], target: float, window: int) -> Optional[Dict]:
    """First step whose smoothed loss is <= target: steps, tokens and wall time until then."""
    wall = 0.0
    for r, s in zip(rows, smoothed([r["lm_loss"] for r in rows], window)):
        wall += r["iteration_time_ms"] / 1e3
        if s <= target:
            return {"steps": r["iteration"], "tokens": r["tokens"], "wall_s": wall}
    return None


def plot(runs: Dict[str, List[Dict]], path: Path, window: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no curves.png")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        loss = smoothed([r["lm_loss"] for r in rows], window)
        tokens = [r["tokens"] for r in rows]
        wall, t = [], 0.0
        for r in rows:
            t += r["iteration_time_ms"] / 1e3
            wall.append(t)
        a.plot(tokens, loss, label=name)
        b.plot(wall, loss, label=name)
    a.set_xlabel("tokens"), b.set_xlabel("wall time (s)")
    a.set_ylabel(f"training loss (moving average of {window})")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = [*passthrough, "--train-samples", str(args.train_samples)]
    runs: Dict[str, List[Dict]] = {}
    for b in [int(x) for x in args.fixed_batches.split(",")]:
        runs[f"fixed-{b}"] = run(f"fixed-{b}", args.nproc, [*common, "--global-batch-size", str(b)], out)
    growth = [*common, "--global-batch-size", str(args.initial_batch), "--gns",
              "--batch-growth", args.growth_rule, "--batch-growth-max", str(args.max_batch),
              "--lr-scaling", args.lr_scaling, *args.growth_args.split()]
    runs["growth"] = run("growth", args.nproc, growth, out)

    final = {n: sum(r["lm_loss"] for r in rows[-args.final_window:]) / min(args.final_window, len(rows))
             for n, rows in runs.items() if n != "growth"}
    best = min(final, key=final.get)
    target = final[best]
    table = {n: reach(rows, target, args.smooth) for n, rows in runs.items()}
    ref = table[best]
    lines = [f"target: final loss of the best fixed run ({best}) = {target:.4f}, "
             f"{args.train_samples} samples per run", "",
             "| run | steps to target | wall s to target | steps vs best fixed | time vs best fixed |",
             "|---|---:|---:|---:|---:|"]
    for n, r in table.items():
        if r is None:
            lines.append(f"| {n} | not reached | | | |")
            continue
        lines.append(f"| {n} | {r['steps']} | {r['wall_s']:.1f} | "
                     f"{r['steps'] / ref['steps']:.2f}x | {r['wall_s'] / ref['wall_s']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"target": target, "best_fixed": best,
                                                  "reach": table, "final": final}, indent=2))
    plot(runs, out / "curves.png", args.smooth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
