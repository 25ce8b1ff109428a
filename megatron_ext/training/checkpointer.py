"""When to save, what goes into a checkpoint, resuming, and how the run ended.

Main API: ``Checkpointer(checkpoint_config, log)`` (``signature``: the model's, set once
the padded vocabulary is known) with ``prepare()`` (which
checkpoint to resume, collective), ``due(state, stop_reason)``, ``save(state, run)``,
``resume(path, state, run, keep_batch)``, ``recording_status(state, stop)`` and
``last_path`` (what a failure names).

A checkpoint holds the model and optimizer shards (``checkpointing.py``) plus the loop
state: the :class:`TrainState`, each component's ``state_dict()`` under its name, the data
phases (which dataset the sample stream reads, from which sample), the LR schedule, the
parallel layout and the model's signature.
Rank 0 alone looks at the directory (``checkpoint_dir.py``: lock, leftovers, the newest
complete checkpoint, free space, retention) and broadcasts what it decided, so every rank
acts alike and a problem is one line printed once.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import List, Optional

import torch

from megatron_ext.training import checkpointing
from megatron_ext.training.checkpoint_dir import CheckpointDir, CheckpointDirError, resolve_load_path
from megatron_ext.training.config import CheckpointConfig
from megatron_ext.training.run_status import write_status
from megatron_ext.training.state import BatchSplitError

def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class Checkpointer:
    """Saves every ``--save-interval`` steps and whenever the run stops."""

    def __init__(self, cfg: CheckpointConfig, log, signature: Optional[dict] = None):
        self.cfg = cfg
        self.signature = signature
        self.log = log
        self.dir = CheckpointDir(cfg.save) if cfg.save else None
        self.last_path: Optional[str] = None
        self.last_save_seconds = 0.0
        self._rank0 = torch.distributed.get_rank() == 0

    # ------------------------------------------------------------------ before training
    def _decide(self) -> dict:
        """Rank 0: lock --save, clear leftovers, pick the checkpoint to resume."""
        notes: List[str] = []
        if self.dir is not None:
            self.dir.lock()
            removed = self.dir.clean_leftovers()
            if removed:
                notes.append(f"--save {self.cfg.save}: removed unfinished saves {', '.join(removed)}")
        resume = None
        if self.cfg.load:
            resume, more = resolve_load_path(self.cfg.load, self.cfg.save)
            notes += more
        elif self.dir is not None and self.dir.iterations():
            newest = self.dir.iteration_dir(self.dir.iterations()[0])
            raise CheckpointDirError(
                f"--save {self.cfg.save} already holds checkpoints ({os.path.basename(newest)}); "
                f"continue that run with --load {self.cfg.save}, or save to a new directory")
        return {"error": None, "resume": resume, "notes": notes}

    def prepare(self) -> Optional[str]:
        """The checkpoint directory to resume from, or None (collective; before the model
        is built, so its loop state can shape the run)."""
        decision = {"error": None}
        if self._rank0:
            try:
                decision = self._decide()
            except CheckpointDirError as e:
                decision = {"error": str(e), "resume": None, "notes": []}
        decision = _broadcast(decision)
        if decision["error"]:
            raise checkpointing.CheckpointMismatch(decision["error"])
        for note in decision["notes"]:
            self.log.announce(note)
        if self.cfg.save:
            checkpointing.start_checkpoint_writer()
        self.last_path = decision["resume"]
        return decision["resume"]

    def resume(self, path: str, state, run, keep_batch: bool) -> None:
        """Load ``path`` into the model, optimizer, state, data and components."""
        loop = checkpointing.load_checkpoint(
            path, run.gpt, run.optimizer, load_optim=not self.cfg.no_load_optim,
            signature=self.signature)
        saved = loop["train_state"]
        try:
            state.load_state_dict(saved, keep_batch=keep_batch)
        except BatchSplitError as e:
            raise checkpointing.CheckpointMismatch(
                f"--load {path}: {e}; resume with a data-parallel size that divides "
                f"it, or set --global-batch-size/--micro-batch-size") from None
        if keep_batch and saved["global_batch_size"] != state.global_batch_size:
            self.log.announce(f"resuming with global batch {state.global_batch_size} "
                              f"(the checkpoint ran {saved['global_batch_size']})")
        for note in run.lr_schedule.load_state_dict(loop.get("lr_schedule")):
            self.log.announce(note)
        saved_components = loop.get("components", {})
        for component in run.components:
            if component.name in saved_components:
                component.load_state_dict(saved_components[component.name])
        self.log.announce(f"resumed from {path} at iteration {state.iteration}")

    # ------------------------------------------------------------------ saving
    def due(self, state, stop_reason: Optional[str]) -> bool:
        """Save after this step? (periodically, and at every stop: end, budget, signal)"""
        if self.dir is None:
            return False
        every = self.cfg.save_interval
        return stop_reason is not None or bool(every and state.iteration % every == 0)

    def _loop_state(self, state, run) -> dict:
        return {"format_version": checkpointing.FORMAT_VERSION,
                "train_state": state.state_dict(),
                "data": run.data.state_dict(),
                "lr_schedule": run.lr_schedule.state_dict(),
                "components": {c.name: c.state_dict() for c in run.components},
                "parallel_layout": checkpointing.parallel_layout(),
                "model": self.signature}

    def save(self, state, run) -> None:
        """Write ``iter_N`` (collective). A failure (a full disk) removes the partial save
        and, with ``--save-failure stop``, raises SaveFailed (one line); with ``continue``
        it is announced and training goes on."""
        run.timers("checkpoint", log_level=1).start()
        start = time.monotonic()
        try:
            problem = _broadcast(self.dir.space_problem() if self._rank0 else None)
            if problem:
                raise checkpointing.SaveFailed(
                    f"not saving iteration {state.iteration} to {self.cfg.save}: {problem}")
            path = checkpointing.save_checkpoint(
                self.dir, state.iteration, run.gpt, run.optimizer, self._loop_state(state, run),
                save_optim=not self.cfg.no_save_optim)
        except checkpointing.SaveFailed as e:
            if self.cfg.save_failure == "stop":
                raise
            self.log.announce(f"WARNING: {e}; training continues (--save-failure continue)")
            return
        finally:
            run.timers("checkpoint").stop()
            self.last_save_seconds = time.monotonic() - start
        self.last_path = str(path)
        self.log.announce(f"saved checkpoint at iteration {state.iteration} to {path}")
        if self._rank0:
            for name in self.dir.retain(self.cfg.keep_last):
                self.log.announce(f"--keep-last {self.cfg.keep_last}: removed {name}")

    # ------------------------------------------------------------------ the end
    @contextlib.contextmanager
    def recording_status(self, state, stop):
        """Write ``run_status.json`` when the block ends: finished, stopped or failed."""
        try:
            yield
        except BaseException as e:
            if self._rank0:
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                write_status(self.cfg.save, "failed", state.iteration, reason, self.last_path)
            raise
        if self._rank0:
            write_status(self.cfg.save, "finished" if stop.complete(state) else "stopped",
                         state.iteration, stop.reason or "", self.last_path)


__all__ = ["Checkpointer"]
