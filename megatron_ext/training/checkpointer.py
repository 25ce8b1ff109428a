"""When to save, what goes into a checkpoint, resuming, and how the run ended.

Main API: ``Checkpointer(checkpoint_config, log)`` (``signature``: the model's, set once
the padded vocabulary is known; ``model_config``: every model flag, for export) with
``prepare()`` (which checkpoint to resume, and whether as ``finetune``; collective),
``due(state, stop_reason)``, ``save(state, run)``, ``resume(path, state, run, keep_batch)``,
``load_weights(path, model)``, ``recording_status(state, stop)`` and ``last_path`` (what a
failure names).

A checkpoint holds the model and optimizer shards (``checkpointing.py``) plus the loop
state: the :class:`TrainState`, each component's ``state_dict()`` under its name, the data
phases (which dataset the sample stream reads, from which sample), the LR schedule, the
parallel layout and the model's signature.
``--finetune``, or a checkpoint that holds only a model (an HF import, Megatron-LM's), loads
the weights only: the run starts at iteration 0 with a new optimizer, fresh data and the
flags' LR schedule. Restarted, a finetune run resumes its own newest checkpoint in ``--save``
instead. An import's ``hf`` entry (the original HuggingFace config) is carried into every
checkpoint saved after it, for ``tools/convert_hf.py export``.
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
        self.model_config: Optional[dict] = None
        self.finetune: Optional[str] = None
        """Why only the weights are loaded (None: a full resume)."""
        self.carried: dict = {}
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
        finetune = self._finetune_reason(resume)
        own = self.dir.newest_complete()[0] if finetune and self.dir else None
        if own and os.path.abspath(own) != os.path.abspath(resume):
            notes.append(f"--save {self.cfg.save} holds {os.path.basename(own)} of this finetune "
                         f"run: resuming it instead of starting again from {resume}")
            resume, finetune = own, None
        return {"error": None, "resume": resume, "notes": notes, "finetune": finetune}

    def _finetune_reason(self, path: Optional[str]) -> Optional[str]:
        if path is None:
            return None
        if self.cfg.finetune:
            return "--finetune"
        if checkpointing.is_model_only(checkpointing.peek_loop_state(path)):
            return "a model-only checkpoint (no training state), loaded as with --finetune"
        return None

    def prepare(self) -> Optional[str]:
        """The checkpoint directory to resume from, or None (collective; before the model
        is built, so its loop state can shape the run)."""
        decision = {"error": None}
        if self._rank0:
            try:
                decision = self._decide()
            except (CheckpointDirError, checkpointing.CheckpointMismatch) as e:
                decision = {"error": str(e), "resume": None, "notes": []}
        decision = _broadcast(decision)
        if decision["error"]:
            raise checkpointing.CheckpointMismatch(decision["error"])
        for note in decision["notes"]:
            self.log.announce(note)
        if self.cfg.save:
            checkpointing.start_checkpoint_writer()
        self.last_path = decision["resume"]
        self.finetune = decision.get("finetune")
        return decision["resume"]

    def load_weights(self, path: str, model) -> dict:
        """Load only the model weights of ``path`` (checked against ``signature``); returns
        its loop state."""
        loop = checkpointing.load_model(path, model, signature=self.signature)
        self._carry(loop)
        return loop

    def _carry(self, loop: dict) -> None:
        """What later checkpoints keep of the loaded one: an import's HF origin."""
        self.carried = {"hf": loop["hf"]} if loop.get("hf") else {}

    def resume(self, path: str, state, run, keep_batch: bool) -> None:
        """Load ``path`` into the model, optimizer, state, data and components (only the
        model when finetuning)."""
        if self.finetune:
            self.load_weights(path, run.gpt)
            self.log.announce(f"{self.finetune}: took only the model weights of {path}; "
                              f"training starts at iteration {state.iteration} with a new "
                              "optimizer and the LR schedule of the flags")
            return
        loop = checkpointing.load_checkpoint(
            path, run.gpt, run.optimizer, load_optim=not self.cfg.no_load_optim,
            signature=self.signature)
        self._carry(loop)
        saved = loop["train_state"]
        if not keep_batch:  # a growing batch: snap to one this layout can split
            from megatron_ext.batch_growth.rounding import resume_batch

            saved, note = resume_batch(saved, state.micro_batch_size, state.data_parallel_size)
            if note:
                self.log.announce(note)
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
                "model": self.signature,
                "model_config": self.model_config, **self.carried}

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
