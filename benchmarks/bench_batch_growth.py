"""Benchmark: does closed-loop batch growth beat fixed batches and Megatron's ramp?

Main API: ``python benchmarks/bench_batch_growth.py [--quick] [--out-dir DIR] [--jobs N]``

Every run trains the same model on the same sample stream (same ``--seed`` -> same order;
the sampler indexes samples by consumed count, so a batch of 8 and one of 64 see the same
samples in the same order) for the same number of samples, with ``--gns`` on in every run
(fixed ones too) so all runs pay the same measurement cost. The grid, per LR schedule
(constant, warmup-stable-decay, cosine) and seed:

* fixed global batches, each with a small LR sweep around ``lr0 * sqrt(B / B0)``;
* open-loop ramps with Megatron's ``--rampup-batch-size`` semantics (``--batch-growth ramp``);
* ``--batch-growth gns`` and ``--batch-growth goodput`` at their default settings.

Measurements (``batch_growth_analysis.py``): the training loss averaged over a fixed-size
window of samples (the same number of samples whatever the batch) on a fixed grid of sample
counts, and the loss on a fixed validation set (the same samples for every run, evaluated
when a run crosses fixed sample counts). Per target loss: steps and samples to reach it, the
steps saved against the fixed-batch frontier S = S_min + E_min / B (McCandlish et al. 2018,
fitted per target over the fixed batches at their best LR) at equal samples, and the final
loss at equal samples; mean and spread over seeds. Writes ``summary.json``, ``summary.md``
and PNG plots into ``--out-dir``.

The training runs are ``megatron_ext.training.train`` itself (no second loop), several per
worker process (``--child``) so the start-up cost is paid once per worker. The only
benchmark-specific piece is the validator, swapped in after ``setup`` builds the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCHEDULES = ("constant", "wsd", "cosine")

# Model and budget of the full run (B_simple grows well past the initial batch on it).
FULL = dict(model=["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
                   "--seq-length", "128", "--max-position-embeddings", "128"],
            samples=8192, b0=8, fixed=[8, 16, 32, 64], lr_mults=[0.5, 1.0, 2.0],
            ramp_fracs=[0.25, 0.5, 0.75], max_batch=64, seeds=[1, 2, 3],
            schedules=list(SCHEDULES), lr=2e-3, warmup=512, corpus_mb=12, valid_samples=256,
            eval_points=8, window=512)
# CI size: one schedule, one seed, a tiny model; exercises every path in < 60 s.
QUICK = dict(model=["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
                    "--seq-length", "32", "--max-position-embeddings", "32"],
             samples=192, b0=4, fixed=[4, 8, 16], lr_mults=[1.0], ramp_fracs=[0.5],
             max_batch=16, seeds=[1], schedules=["cosine"], lr=3e-3, warmup=32, corpus_mb=1,
             valid_samples=16, eval_points=2, window=48,
             growth_extra=["--batch-growth-interval", "2", "--batch-growth-min-steps", "2"])


def schedule_flags(name: str, samples: int, warmup: int) -> List[str]:
    """LR schedule over samples: constant after warmup; WSD (warmup, stable, linear decay
    over the last 20% of the samples, Hu et al. 2024 "MiniCPM"); cosine to 0."""
    base = ["--lr-warmup-samples", str(warmup), "--lr-decay-samples", str(samples)]
    if name == "constant":
        return base + ["--lr-decay-style", "constant"]
    if name == "wsd":
        return base + ["--lr-decay-style", "WSD", "--lr-wsd-decay-samples", str(samples // 5)]
    return base + ["--lr-decay-style", "cosine"]


def build_grid(cfg: dict, out: Path) -> List[dict]:
    """Every run: name, group (fixed/ramp/gns/goodput), batch info, argv."""
    runs = []
    b0, bmax = cfg["b0"], cfg["max_batch"]
    for sched in cfg["schedules"]:
        for seed in cfg["seeds"]:
            common = [*cfg["model"], "--train-samples", str(cfg["samples"]), "--seed", str(seed),
                      "--gns", "--log-interval", "1", "--eval-interval", "1000000000",
                      "--default-corpus-mb", str(cfg["corpus_mb"]),
                      "--data-cache-path", str(out / "data_cache"),
                      *schedule_flags(sched, cfg["samples"], cfg["warmup"])]
            tag = f"{sched}/s{seed}"

            def add(name, group, lr, extra, batch, lr_mult=1.0):
                runs.append(dict(name=f"{tag}/{name}", schedule=sched, seed=seed, group=group,
                                 label=name, batch=batch, lr_mult=lr_mult,
                                 argv=[*common, "--lr", f"{lr:.6g}", *extra]))

            for b in cfg["fixed"]:
                micro = min(b, 8)
                for m in cfg["lr_mults"]:
                    lr = cfg["lr"] * math.sqrt(b / b0) * m
                    add(f"fixed-{b}-lr{m:g}", "fixed", lr,
                        ["--global-batch-size", str(b), "--micro-batch-size", str(micro)], b, m)
            growth = ["--global-batch-size", str(b0), "--micro-batch-size", str(b0),
                      "--batch-growth-max", str(bmax), "--lr-scaling", "sqrt"]
            for frac in cfg["ramp_fracs"]:
                ramp_samples = int(cfg["samples"] * frac)
                add(f"ramp-{frac:g}", "ramp", cfg["lr"],
                    [*growth, "--batch-growth", "ramp", "--rampup-batch-size", str(b0), str(b0),
                     str(ramp_samples)], None)
            for rule in ("gns", "goodput"):
                add(rule, rule, cfg["lr"],
                    [*growth, "--batch-growth", rule, *cfg.get("growth_extra", [])], None)
            for label, flags in cfg.get("variants", {}).items():  # candidate controllers
                add(label, "variant", cfg["lr"], [*growth, *cfg.get("growth_extra", []),
                                                  *flags.split()], None)
    return runs


# ---------------------------------------------------------------- child: runs in-process
def _run_one(spec: dict, valid_samples: int, marks: List[int]) -> None:
    """One training run through the product's ``train``; the validator is swapped for one
    that evaluates a fixed set of validation samples at fixed consumed-sample counts."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_ext.training import loop, session
    from megatron_ext.training.data import Evaluator
    from megatron_ext.training.job import parse_job

    evals: List[dict] = []

    class FixedSampleValidator(Evaluator):
        """The first ``valid_samples`` validation samples, whatever the run's batch, each
        time the run crosses the next mark (runs differ by < one batch at a mark)."""

        def __init__(self, job, data, forward_backward):
            super().__init__(job, data, forward_backward, "valid")
            self.micro = min(8, valid_samples)
            self.global_batch, self.iters = valid_samples, 1
            self.pending = list(marks)

        def due(self, state) -> bool:
            hit = self.pending and state.consumed_samples >= self.pending[0]
            while self.pending and state.consumed_samples >= self.pending[0]:
                self.pending.pop(0)
            self._at = (state.iteration, state.consumed_samples)
            return bool(self.enabled and hit)

        def run(self, model):
            loss = super().run(model)
            evals.append(dict(iteration=self._at[0], samples=self._at[1], loss=loss))
            return loss

    original = session.setup

    def setup(job):
        r = original(job)
        r.validator = FixedSampleValidator(job, r.data, r.forward_backward)
        return r

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from megatron_ext.training.initialize import _free_port

    os.environ["MASTER_PORT"] = str(_free_port())
    session.setup = setup
    t0 = time.perf_counter()
    try:
        loop.train(parse_job([*spec["argv"], "--log-json", spec["log"]]))
    finally:
        session.setup = original
        destroy_num_microbatches_calculator()
        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(spec["evals"]).write_text(json.dumps(dict(evals=evals,
                                                   wall_s=time.perf_counter() - t0)))


def child_main(path: str) -> int:
    job = json.loads(Path(path).read_text())
    loop_mod = __import__("megatron_ext.training.loop", fromlist=["_configure_logging"])
    loop_mod._configure_logging()
    for spec in job["runs"]:
        if Path(spec["evals"]).exists():
            continue  # done in an earlier (interrupted) invocation
        if Path(spec["log"]).exists():
            Path(spec["log"]).unlink()
        print(f"=== {spec['name']}", flush=True)
        _run_one(spec, job["valid_samples"], job["marks"])
    return 0


# ---------------------------------------------------------------- driver
def run_grid(runs: List[dict], cfg: dict, out: Path, jobs: int) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    step = cfg["samples"] // cfg["eval_points"]
    marks = [step * (i + 1) for i in range(cfg["eval_points"])]
    for r in runs:
        stem = r["name"].replace("/", "__")
        r["log"], r["evals"] = str(logs / f"{stem}.jsonl"), str(logs / f"{stem}.evals.json")
    todo = [r for r in runs if not Path(r["evals"]).exists()]
    # Longest runs first spread over workers (small fixed batches take the most steps).
    todo.sort(key=lambda r: r["batch"] or cfg["b0"])
    shards = [todo[i::jobs] for i in range(jobs)]
    procs = []
    for i, shard in enumerate(s for s in shards if s):
        spec = out / f"worker{i}.json"
        spec.write_text(json.dumps(dict(runs=shard, valid_samples=cfg["valid_samples"],
                                        marks=marks)))
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", str(spec)], env=env,
                                      stdout=open(out / f"worker{i}.log", "w"),
                                      stderr=subprocess.STDOUT))
    print(f"{len(todo)} of {len(runs)} runs to do on {len(procs)} worker(s)", flush=True)
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"worker(s) {failed} failed: see {out}/worker<i>.log")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out-dir", default=str(HERE / "results" / "batch_growth"))
    p.add_argument("--quick", action="store_true", help="CI-size grid (< 60 s)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one per core)")
    p.add_argument("--samples", type=int, help="override the sample budget per run")
    p.add_argument("--seeds", help="override the seeds, e.g. 1,2")
    p.add_argument("--schedules", help=f"override the schedules, subset of {SCHEDULES}")
    p.add_argument("--fixed", help="override the fixed global batches, e.g. 8,16,32,64")
    p.add_argument("--lr-mults", help="override the LR sweep of fixed batches, e.g. 0.5,1,2")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="extra growth run with these flags (e.g. 'gns-k2=--batch-growth gns "
                        "--batch-growth-k 2'); runs already in --out-dir are reused")
    p.add_argument("--only", help="run only these labels (comma list, e.g. the --variant "
                                  "labels); analysis still needs the rest of the grid")
    p.add_argument("--analyse-only", action="store_true", help="re-analyse existing logs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    cfg = dict(QUICK if args.quick else FULL)
    if args.samples:
        cfg["samples"] = args.samples
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.schedules:
        cfg["schedules"] = args.schedules.split(",")
        bad = set(cfg["schedules"]) - set(SCHEDULES)
        if bad:
            raise SystemExit(f"--schedules: unknown {sorted(bad)}; pick from {SCHEDULES}")
    if args.fixed:
        cfg["fixed"] = [int(b) for b in args.fixed.split(",")]
    if args.lr_mults:
        cfg["lr_mults"] = [float(m) for m in args.lr_mults.split(",")]
    cfg["variants"] = dict(v.split("=", 1) for v in args.variant)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = build_grid(cfg, out)
    t0 = time.perf_counter()
    if args.only:
        keep = set(args.only.split(","))
        todo = [r for r in runs if r["label"] in keep]
        run_grid(todo, cfg, out, max(1, args.jobs))
        print(f"ran {len(todo)} runs ({args.only}); analyse with the whole grid in one dir")
        return 0
    if not args.analyse_only:
        run_grid(runs, cfg, out, max(1, args.jobs))
    else:
        for r in runs:
            stem = r["name"].replace("/", "__")
            r["log"] = str(out / "logs" / f"{stem}.jsonl")
            r["evals"] = str(out / "logs" / f"{stem}.evals.json")
    from batch_growth_analysis import analyse

    summary = analyse(runs, cfg, out)
    summary["config"] = {k: v for k, v in cfg.items()}
    summary["command"] = " ".join(["python", "benchmarks/bench_batch_growth.py",
                                   *(argv if argv is not None else sys.argv[1:])])
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
