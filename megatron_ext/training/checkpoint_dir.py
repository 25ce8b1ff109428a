"""The ``--save`` directory: which checkpoints are complete, a lock, retention, leftovers.

Main API: ``CheckpointDir(root)`` with :meth:`~CheckpointDir.newest_complete`,
:meth:`~CheckpointDir.verify`, :meth:`~CheckpointDir.write_manifest`,
:meth:`~CheckpointDir.lock`, :meth:`~CheckpointDir.clean_leftovers`,
:meth:`~CheckpointDir.retain`; :func:`resolve_load_path`.

A checkpoint ``iter_N`` is written as ``iter_N.tmp`` and gets ``manifest.json`` last: the size
of every file every rank wrote. It is *complete* when the manifest is there and every file
in it has that size; a checkpoint with a missing or truncated shard, a missing ``common.pt``,
``.metadata`` or ``rank_*.pt``, or no manifest, is damaged and skipped in favour of the newest
complete one. The ``latest_checkpointed_iteration.txt`` marker is still written (Megatron-LM's
tools read it) but never trusted: resuming scans the ``iter_*`` directories. Checkpoints
written before manifests existed (format 1) count as complete when ``common.pt`` and
``.metadata`` are there.

Pure Python (os, json, fcntl): rank 0 runs it and broadcasts what it found.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from typing import Dict, List, Optional, Tuple

MANIFEST = "manifest.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
LOCK_FILE = ".megatron_ext.lock"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointDirError(ValueError):
    """A --save/--load directory this run cannot use (message: one line with the fix)."""


def iteration_of(path: str) -> Optional[int]:
    """N of a path ending in ``iter_N`` (None otherwise)."""
    m = _ITER_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


class CheckpointDir:
    def __init__(self, root: str):
        self.root = root
        self._lock_fd: Optional[int] = None

    def iteration_dir(self, iteration: int) -> str:
        return os.path.join(self.root, f"iter_{iteration:07d}")

    def iterations(self) -> List[int]:
        """Iterations with an ``iter_N`` directory, newest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        found = [iteration_of(n) for n in names if os.path.isdir(os.path.join(self.root, n))]
        return sorted((n for n in found if n is not None), reverse=True)

    # ------------------------------------------------------------------ completeness
    @staticmethod
    def write_manifest(ckpt_dir: str, iteration: int, world_size: int) -> None:
        """Record every file's size; written last, after every rank finished writing."""
        files = {}
        for base, _, names in os.walk(ckpt_dir):
            for name in names:
                path = os.path.join(base, name)
                files[os.path.relpath(path, ckpt_dir)] = os.path.getsize(path)
        record = {"iteration": iteration, "world_size": world_size, "files": files}
        with open(os.path.join(ckpt_dir, MANIFEST), "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def verify(ckpt_dir: str) -> Optional[str]:
        """None if ``ckpt_dir`` is a complete checkpoint, else what is wrong (a few words)."""
        try:
            with open(os.path.join(ckpt_dir, MANIFEST)) as f:
                files: Dict[str, int] = json.load(f)["files"]
        except FileNotFoundError:
            legacy = [n for n in ("common.pt", ".metadata")
                      if not os.path.isfile(os.path.join(ckpt_dir, n))]
            return (f"no {MANIFEST} and missing {', '.join(legacy)}" if legacy else None)
        except (OSError, ValueError, KeyError, TypeError):
            return f"unreadable {MANIFEST}"
        for rel, size in sorted(files.items()):
            path = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(path):
                return f"missing {rel}"
            if os.path.getsize(path) != size:
                return f"{rel} has {os.path.getsize(path)} of {size} bytes"
        return None

    def newest_complete(self) -> Tuple[Optional[str], List[str]]:
        """(newest complete checkpoint dir or None, one line per newer damaged one)."""
        damaged = []
        for n in self.iterations():
            path = self.iteration_dir(n)
            problem = self.verify(path)
            if problem is None:
                return path, damaged
            damaged.append(f"{os.path.basename(path)} is damaged ({problem})")
        return None, damaged

    @staticmethod
    def checkpoint_bytes(ckpt_dir: str) -> int:
        """Total size of the files of a checkpoint."""
        total = 0
        for base, _, names in os.walk(ckpt_dir):
            total += sum(os.path.getsize(os.path.join(base, n)) for n in names)
        return total

    def space_problem(self, free_bytes: Optional[int] = None, margin: float = 1.1) -> Optional[str]:
        """Why the disk cannot take one more checkpoint the size of the newest complete one
        (times ``margin``), or None; ``free_bytes`` defaults to what the filesystem says."""
        newest, _ = self.newest_complete()
        if newest is None:
            return None
        need = self.checkpoint_bytes(newest) * margin
        free = shutil.disk_usage(self.root).free if free_bytes is None else free_bytes
        if free >= need:
            return None
        return (f"only {free / 2**30:.3f} GiB free where a checkpoint needs about "
                f"{need / 2**30:.3f} GiB")

    # ------------------------------------------------------------------ housekeeping
    def mark_latest(self, iteration: int) -> None:
        tmp = os.path.join(self.root, LATEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(self.root, LATEST_FILE))

    def clean_leftovers(self) -> List[str]:
        """Remove ``iter_N.tmp`` directories of saves that never finished."""
        removed = []
        for name in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            if name.endswith(".tmp") and name.startswith("iter_"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                removed.append(name)
        return removed

    def retain(self, keep_last: Optional[int]) -> List[str]:
        """Delete all but the ``keep_last`` newest complete checkpoints (damaged ones too)."""
        if not keep_last:
            return []
        removed, kept = [], 0
        for n in self.iterations():
            path = self.iteration_dir(n)
            if kept < keep_last and self.verify(path) is None:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
        return removed

    def lock(self) -> None:
        """Hold an exclusive lock on the directory until the process exits (a second run
        into the same --save refuses instead of interleaving its checkpoints)."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointDirError(
                f"--save {self.root} is in use by another run ({holder}); wait for it to end "
                "or save elsewhere") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._lock_fd = fd


def resolve_load_path(load: str, save: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """The checkpoint directory ``--load`` means, and notes for the log.

    ``load`` may be a --save directory (its newest complete checkpoint) or one ``iter_N``
    directory. Returns (None, notes) for a fresh start: ``--load`` equal to ``--save`` with
    nothing saved yet (the job script's auto-resume on its first run). Raises
    CheckpointDirError for anything else that holds no usable checkpoint.
    """
    if iteration_of(load) is not None and os.path.isdir(load):
        problem = CheckpointDir.verify(load)
        if problem:
            raise CheckpointDirError(f"--load {load}: checkpoint is damaged ({problem})")
        return load, []
    path, damaged = CheckpointDir(load).newest_complete()
    notes = [f"--load {load}: {d}" for d in damaged]
    if path is not None:
        if damaged:
            notes.append(f"--load {load}: resuming from {os.path.basename(path)}, the newest "
                         "complete checkpoint")
        return path, notes
    same_as_save = save is not None and os.path.abspath(save) == os.path.abspath(load)
    if same_as_save and not damaged:
        return None, [f"--load {load}: no checkpoint yet, starting fresh"]
    what = "only damaged checkpoints" if damaged else "no checkpoint (iter_N directory)"
    raise CheckpointDirError(f"--load {load}: {what} there; point --load at a --save "
                             "directory of an earlier run, or at one of its iter_N directories")


__all__ = ["CheckpointDir", "CheckpointDirError", "resolve_load_path", "iteration_of",
           "MANIFEST", "LATEST_FILE"]
