"""Run ``examples/pretrain_gpt.py`` under torchrun from tests and read back its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_gpt.py"

# A tiny GPT that every parallel layout can split: 4 layers (PP=2), 4 heads (TP=2), vocab
# padded to 512 under TP 1 and 2 alike, so all layouts hold the same full model.
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--make-vocab-size-divisible-by", "256", "--lr", "1e-3", "--lr-decay-style", "constant",
    "--log-interval", "1", "--eval-interval", "1000", "--seed", "7",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(nproc: int, args: Sequence[str], workdir: Path, timeout: int = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # training on CPU uses the PyTorch reference path
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(path: Path) -> Dict[int, float]:
    return {m["iteration"]: m["lm_loss"] for m in read_metrics(path) if "lm_loss" in m}


def logged_steps(nproc: int, args: Sequence[str], workdir: Path, name: str) -> Dict[int, Dict]:
    """Run ``TINY + args`` with a data cache and a --log-json in ``workdir``; its logged
    steps by iteration."""
    out = workdir / f"{name}.jsonl"
    run_pretrain(nproc, [*TINY, *args, "--data-cache-path", str(workdir / "dc"),
                         "--log-json", str(out)], workdir)
    return {m["iteration"]: m for m in read_metrics(out) if "lm_loss" in m}
