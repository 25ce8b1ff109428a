"""How a run ended, for job scripts: ``<save>/run_status.json`` and a CLI with exit codes.

Main API: :func:`write_status` (rank 0, at exit), :func:`read_status`, and
``python -m megatron_ext.training.run_status SAVE_DIR``, which prints one line and exits

    0  finished (nothing left to train)
    3  stopped with a checkpoint (signal, --exit-duration-in-mins, --exit-interval): requeue
    1  failed, or no status (the run crashed before writing one)

Why a file: under ``torchrun`` a worker that exits non-zero makes the agent print a stack
trace and exit 1 whatever the code, so the training processes exit 0 after a clean stop (as
Megatron-LM does) and the job script asks this module what happened.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

STATUS_FILE = "run_status.json"
EXIT_CODES = {"finished": 0, "stopped": 3, "failed": 1}


def write_status(save_dir: Optional[str], status: str, iteration: int, reason: str,
                 checkpoint: Optional[str] = None) -> None:
    """Atomically record how the run ended (call on global rank 0; no-op without --save)."""
    if not save_dir:
        return
    if status not in EXIT_CODES:
        raise ValueError(f"status must be one of {sorted(EXIT_CODES)}, got {status!r}")
    record = {"status": status, "iteration": int(iteration), "reason": reason,
              "checkpoint": checkpoint, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = os.path.join(save_dir, STATUS_FILE)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError:  # a full disk must not turn a clean stop into a crash
        pass


def read_status(save_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(save_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m megatron_ext.training.run_status SAVE_DIR\n"
              "exit 0: finished, 3: stopped with a checkpoint (requeue), 1: failed or unknown",
              file=sys.stderr)
        return 1
    record = read_status(argv[0])
    if record is None:
        print(f"run_status: no {STATUS_FILE} in {argv[0]} (the run did not end cleanly)")
        return 1
    print(f"run_status: {record['status']} at iteration {record['iteration']}: "
          f"{record['reason']}")
    return EXIT_CODES.get(record["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
