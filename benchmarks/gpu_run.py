"""One GPU session's run: the decisive numbers first, every stage under its own timeout.

Main API: ``python benchmarks/gpu_run.py [--out DIR] [--budget-s 570] [--wheels PATH ...]
[--stages a,b] [--cpu-smoke]``; ``plan_stages(args)`` (the stage list) and ``fits(...)``
(the envelope rule) are what the CI test checks besides a whole ``--cpu-smoke`` run.

Stages, in order of decisiveness (issue 14): ``env`` (wheels, versions, device ->
env.json), ``kernel_smoke`` (one small shape: fused kernel vs cuBLAS dW and an fp32 loop),
``kernel_table`` (fused/cuBLAS, Triton-dW-only/cuBLAS, fused/dW-only and the chosen GNS route
per shape, row by row), ``gns_overhead`` (--gns on/off every step and at the measure
interval), ``pretrain`` (a bf16 run of examples/pretrain_gpt.py), ``long_context``
(4k/16k/64k x none/full recompute of a ~1B GPT under an 80 GiB cap) and ``gpu_tests`` (the
GPU tests, with what time is left). Each stage is a subprocess with its own timeout (its
budget, or what is left of the envelope for the last one); a stage whose budget exceeds what
is left of --budget-s is skipped with a row saying so. A stage that fails or times out does
not stop the later ones.

Files under --out (4; the device tool returns at most 8): ``rows.jsonl`` (one JSON line per
measured row, written as the stages print them, plus one ``stage_end`` line per stage),
``run.log`` (every stage's output), ``env.json`` and ``summary.json`` (stage statuses and
times, rewritten after each stage). ``--cpu-smoke`` runs every stage at tiny sizes on CPU
(kernels in Triton's interpreter or skipped with "skipped: no CUDA"), for CI.

megatron-core travels as a wheel (the GPU machine has no network): --wheels names wheel
files or folders (default: ``shared/wheels`` and ``.whl`` where present); they are installed
with pip --no-index --no-deps into a folder under --work-dir that goes first on PYTHONPATH,
the checkout next. Where megatron_ext is not installed, ``megatron_ext/kernels`` becomes a
link to ``kernels/`` (setup.py's layout), so no install is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@dataclass
class Stage:
    """One subprocess of the run."""

    name: str
    budget_s: float  # its timeout; skipped when more than what is left of the envelope
    argv: List[str]
    needs_cuda: bool = False  # on CPU: skipped with "skipped: no CUDA"
    needs_mcore: bool = False  # without megatron-core: skipped
    last: bool = False  # runs with whatever is left (at least budget_s)
    env: dict = field(default_factory=dict)


def plan_stages(args, cuda: bool) -> List[Stage]:
    """The run's stages in order, GPU sizes or (--cpu-smoke) tiny CPU sizes."""
    py, smoke = sys.executable, args.cpu_smoke
    wgrad = [py, str(BENCH / "bench_wgrad_sample_norm.py")]
    interp = {"TRITON_INTERPRET": "1"} if smoke else {}
    if smoke:
        kernel_smoke = wgrad + ["--cpu-smoke", "--stage", "kernel_smoke", "--shapes", "3,8,16,16"]
        table = wgrad + ["--cpu-smoke", "--shapes", "2,16,32,48"]
        gns = ["--cpu-smoke", "--measure-interval", "2"]
        pre = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
               "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--train-iters", "3", "--log-interval", "1"]
        long = ["--cpu-smoke", "--seq-lengths", "64", "--recompute", "none,full"]
        tests = []
    else:
        kernel_smoke = wgrad + ["--stage", "kernel_smoke", "--shapes", "4,512,1024,1024",
                                "--calls", "5", "--reps", "2", "--warmup", "2", "--no-graphs"]
        table = wgrad + ["--calls", "20", "--reps", "5", "--warmup", "3"]
        gns = ["--layers", "8", "--seq-length", "4096", "--micro-batches", "2", "--steps", "6",
               "--warmup", "2", "--interval-windows", "2"]
        pre = ["--bf16", "--num-layers", "8", "--hidden-size", "2048",
               "--num-attention-heads", "16", "--seq-length", "4096", "--micro-batch-size", "1",
               "--global-batch-size", "8", "--train-iters", "12", "--log-interval", "4",
               "--eval-iters", "2",
               "--lr", "3e-4", "--make-vocab-size-divisible-by", "128"]
        long = ["--seq-lengths", "4096,16384,65536", "--recompute", "none,full",
                "--memory-cap-gb", "80", "--global-tokens", "65536", "--steps", "2",
                "--warmup", "1"]
        tests = ["tests/test_kernel_wgrad_sample_norm.py",
                 "tests/test_kernel_norm_param_sample_norm.py",
                 "tests/test_attention.py", "tests/test_gns_routes.py"]
        tests = [t for t in tests if (ROOT / t).exists()]  # routes: issue 14's other half
    tmp = str(Path(args.work_dir) / "json")
    launcher = [py] if smoke else [py, "-m", "torch.distributed.run", "--nproc_per_node", "1"]

    def budget(gpu_s, cpu_s):  # seconds on the GPU machine, or in the CPU smoke run
        return (cpu_s if smoke else gpu_s) * getattr(args, "timeout_scale", 1.0)

    return [
        Stage("kernel_smoke", budget(75, 40), kernel_smoke, env=interp),
        Stage("kernel_table", budget(140, 40), table, needs_cuda=True),
        Stage("gns_overhead", budget(100, 60),
              [py, str(BENCH / "bench_gns_overhead.py"), *gns, "--out", f"{tmp}/gns.json"],
              needs_mcore=True),
        Stage("pretrain", budget(70, 60),
              [*launcher, str(ROOT / "examples" / "pretrain_gpt.py"), "--mock-data", *pre],
              needs_mcore=True),
        Stage("long_context", budget(150, 60),
              [py, str(BENCH / "bench_long_context.py"), *long, "--out", f"{tmp}/long.json"],
              needs_mcore=True),
        Stage("gpu_tests", budget(20, 30),
              [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], needs_cuda=True,
              last=True),
    ]


def fits(budget_s: float, left_s: float, last: bool = False) -> bool:
    """The envelope rule: a stage runs only if its whole budget fits in what is left."""
    return left_s >= budget_s if not last else left_s >= min(budget_s, 15.0)


# ----------------------------------------------------------------------------- output
class Recorder:
    """rows.jsonl, run.log and summary.json under --out (written as the run goes)."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.rows = open(out / "rows.jsonl", "a")
        self.log = open(out / "run.log", "a")
        self.stages = []

    def row(self, row: dict) -> None:
        self.rows.write(json.dumps(row) + "\n")
        self.rows.flush()

    def line(self, stage: str, text: str) -> None:
        self.log.write(f"[{stage}] {text}\n")
        self.log.flush()
        print(f"[{stage}] {text}", flush=True)

    def stage_end(self, info: dict) -> None:
        self.stages.append(info)
        self.row(dict(info, event="stage_end"))
        (self.out / "summary.json").write_text(json.dumps({"stages": self.stages}, indent=2))


_PRETRAIN = re.compile(r"iteration\s+(\d+)/\s*\d+ .*elapsed time per iteration \(ms\): ([\d.]+)"
                       r".*lm loss: ([\dE+.-]+).*tokens/s: (\d+) \| TFLOP/s/GPU: ([\d.]+)"
                       r" \| mem: ([\d.]+) GiB")
_PYTEST = re.compile(r"(\d+) (passed|failed|skipped|errors?)")


def rows_from_line(stage: str, text: str) -> List[dict]:
    """Measured rows in one line of a stage's output: a JSON object with a "stage" key, a
    pretrain log iteration line, or pytest's summary line."""
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return []
        return [obj] if isinstance(obj, dict) and "stage" in obj else []
    m = _PRETRAIN.search(text)
    if m:
        keys = ("iteration", "ms_per_iteration", "lm_loss", "tokens_per_s", "tflops_per_gpu",
                "mem_gib")
        return [dict(stage=stage, **{k: float(v) for k, v in zip(keys, m.groups())})]
    if stage == "gpu_tests" and re.search(r" in [\d.]+s", text) and _PYTEST.search(text):
        return [dict(stage=stage, **{k: int(n) for n, k in _PYTEST.findall(text)})]
    return []


def run_stage(rec: Recorder, stage: Stage, timeout_s: float, env: dict) -> dict:
    """Run one stage's subprocess (own process group) under `timeout_s`; stream its output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(stage.argv, cwd=ROOT, env={**env, **stage.env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, bufsize=1)

    def pump():
        for raw in proc.stdout:
            text = raw.rstrip("\n")
            rec.line(stage.name, text)
            for row in rows_from_line(stage.name, text):
                rec.row(row)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group only
        proc.wait()
        status = f"timeout after {timeout_s:.0f} s"
    reader.join(timeout=5)
    return dict(stage=stage.name, status=status, seconds=round(time.monotonic() - t0, 1),
                timeout_s=round(timeout_s, 1))


# ----------------------------------------------------------------------------- env stage
def find_wheels(paths: List[str]) -> List[str]:
    """Wheel files named by --wheels (files or folders), else in shared/wheels and .whl."""
    given = [Path(p) for p in paths] or [ROOT / "shared" / "wheels", ROOT / ".whl"]
    found = []
    for p in given:
        if p.is_dir():
            found += sorted(str(w) for w in p.glob("*.whl"))
        elif p.suffix == ".whl" and p.exists():
            found.append(str(p))
        elif paths:
            raise SystemExit(f"gpu_run: --wheels {p}: no such wheel or folder")
    return found


def link_kernels() -> Path:
    """Without an installed megatron_ext (the GPU machine) `megatron_ext.kernels` does not
    import from a checkout: link megatron_ext/kernels -> ../kernels, setup.py's layout (a
    link, not PYTHONPATH: `python -m` and pytest put the checkout first on sys.path)."""
    link = ROOT / "megatron_ext" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return link


_PROBE = r"""
import json, platform, sys, importlib.metadata as md, importlib.util as iu
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "triton", "megatron-core", "numpy", "psutil", "pytest"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
try:
    info["megatron.core"] = bool(iu.find_spec("megatron.core"))
except ModuleNotFoundError:
    info["megatron.core"] = False
import torch
info["cuda"] = torch.version.cuda
info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=list(torch.cuda.get_device_capability()),
                sms=p.multi_processor_count, total_mem_gib=p.total_memory / 2**30)
else:
    info["device"] = "cpu"
try:
    import megatron_ext.kernels as k
    info["kernels_from"] = k.__file__
except ImportError as e:
    info["kernels_from"] = None
print(json.dumps(info))
"""


def env_stage(rec: Recorder, args, env: dict):
    """Install the wheels, make megatron_ext.kernels importable, record versions and the
    device; returns (env info, stage_end row)."""
    t0 = time.monotonic()
    site = Path(args.work_dir) / "site"
    site.mkdir(parents=True, exist_ok=True)
    wheels, pip_rc = find_wheels(args.wheels), 0
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        pip_rc = r.returncode
        rec.line("env", f"pip install {len(wheels)} wheel(s): exit {pip_rc} "
                        f"{r.stderr.strip()[-500:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])

    def probe():
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        return r, (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                   else {"probe_error": r.stderr[-2000:]})

    r, info = probe()
    if r.returncode == 0 and not info.get("kernels_from"):
        rec.line("env", f"megatron_ext.kernels not importable: linking {link_kernels()}")
        r, info = probe()
    info["wheels"] = [Path(w).name for w in wheels]
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    if shutil.which("git"):
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True)
        info["commit"] = git.stdout.strip() or None
    (rec.out / "env.json").write_text(json.dumps(info, indent=2))
    rec.line("env", json.dumps(info))
    rec.row(dict(info, stage="env"))
    status = "ok" if r.returncode == 0 and pip_rc == 0 and info.get("kernels_from") else \
        f"failed ({'pip install' if pip_rc else 'probe'})"
    return info, dict(stage="env", status=status,
                      seconds=round(time.monotonic() - t0, 1))


_DIGEST = {  # stage -> the fields worth a line at the end of the output
    "kernel_smoke": ("b", "s", "d_in", "d_out", "accuracy_ok", "dw_max_rel_err",
                     "norm_max_rel_err"),
    "kernel_table": ("b", "s", "d_in", "d_out", "timing", "fused/cublas", "triton_dw/cublas",
                     "fused/triton_dw", "route", "route/cublas"),
    "gns_overhead": ("measure_interval", "step_s_off", "step_s_on", "ratio_on_off"),
    "pretrain": ("iteration", "ms_per_iteration", "tokens_per_s", "tflops_per_gpu", "mem_gib"),
    "long_context": ("recompute", "seq_length", "status", "mfu", "peak_reserved_gib",
                     "allocator_limit_gib"),
    "gpu_tests": ("passed", "failed", "skipped", "error", "errors"),
}


def digest(rows_path: Path) -> List[str]:
    """One short line per measured row (the device tool returns only the output's tail)."""
    lines = []
    for text in rows_path.read_text().splitlines():
        row = json.loads(text)
        keys = _DIGEST.get(row.get("stage"))
        if keys and "event" not in row:
            vals = [f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}"
                    for k in keys if k in row]
            lines.append(f"{row['stage']}: " + " ".join(vals))
    return lines


# ----------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="result folder ($OUT)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="the whole run's envelope in seconds (default 570; 120 with --cpu-smoke)")
    p.add_argument("--wheels", action="append", default=[],
                   help="wheel file or folder to install first (repeatable); default: "
                        "shared/wheels and .whl where present")
    p.add_argument("--stages", default="", help="comma list: run only these (env always runs)")
    p.add_argument("--work-dir", default="/tmp/megatron_ext_gpu_run",
                   help="scratch: installed wheels, staged package, per-benchmark JSON")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every stage budget (a slower or busy machine)")
    p.add_argument("--cpu-smoke", action="store_true", help="every stage at tiny sizes on CPU")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (120.0 if args.cpu_smoke else 570.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    rec = Recorder(Path(args.out))
    (Path(args.work_dir) / "json").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1")
    # GNS route choices and tuned kernel configs, shared by the stages of this run.
    env.setdefault("MEGATRON_EXT_CACHE_DIR", str(Path(args.work_dir) / "cache"))
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    info, end = env_stage(rec, args, env)
    rec.stage_end(end)
    cuda = info.get("device") not in (None, "cpu")
    wanted = set(filter(None, args.stages.split(",")))
    for stage in plan_stages(args, cuda):
        left = args.budget_s - (time.monotonic() - start)
        skip = None
        if wanted and stage.name not in wanted:
            skip = "skipped: not in --stages"
        elif stage.needs_cuda and not cuda:
            skip = "skipped: no CUDA"
        elif stage.needs_mcore and not info.get("megatron.core"):
            skip = "skipped: megatron-core not importable (pass --wheels)"
        elif not fits(stage.budget_s, left, stage.last):
            skip = f"skipped: budget {stage.budget_s:.0f} s > {left:.0f} s left"
        if skip:
            rec.line(stage.name, skip)
            rec.stage_end(dict(stage=stage.name, status=skip, seconds=0.0))
            continue
        timeout = max(left, 1.0) if stage.last else stage.budget_s
        rec.line(stage.name, f"start (timeout {timeout:.0f} s, {left:.0f} s left): "
                             + " ".join(stage.argv[1:]))
        rec.stage_end(run_stage(rec, stage, timeout, env))
    total = time.monotonic() - start
    print("\n== gpu_run digest (all rows: rows.jsonl) ==")
    for line in digest(rec.out / "rows.jsonl"):
        print(line)
    print("\n== gpu_run summary ({:.0f} s of {:.0f} s) ==".format(total, args.budget_s))
    for s in rec.stages:
        print(f"{s['stage']:>13}: {s['status']} ({s['seconds']} s)")
    bad = [s for s in rec.stages if not (s["status"] == "ok" or s["status"].startswith("skipped"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
