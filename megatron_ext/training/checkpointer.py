"""When to save, what goes into a checkpoint, and resuming from one.

Main API: ``Checkpointer(checkpoint_config, signature, log)`` with ``due(state, stop_reason)``,
``save(state, run)``, ``resume(state, run)`` and ``last_path`` (what a failure names).

A checkpoint holds the model and optimizer shards (``checkpointing.py``) plus the loop
state: the :class:`TrainState`, each component's ``state_dict()`` under its name, the
dataset length the sample stream indexes, the parallel layout and the model's signature.
"""
from __future__ import annotations

from typing import Optional

from megatron_ext.training import checkpointing
from megatron_ext.training.config import CheckpointConfig
from megatron_ext.training.state import BatchSplitError


class Checkpointer:
    """Saves every ``--save-interval`` steps and whenever the run stops."""

    def __init__(self, cfg: CheckpointConfig, signature: dict, log):
        self.cfg = cfg
        self.signature = signature
        self.log = log
        self.last_path: Optional[str] = cfg.load

    def due(self, state, stop_reason: Optional[str]) -> bool:
        """Save after this step? (periodically, and at every stop: end, budget, signal)"""
        if not self.cfg.save:
            return False
        every = self.cfg.save_interval
        return stop_reason is not None or bool(every and state.iteration % every == 0)

    def _loop_state(self, state, run) -> dict:
        return {"format_version": checkpointing.FORMAT_VERSION,
                "train_state": state.state_dict(),
                "data": run.data.state_dict(),
                "components": {c.name: c.state_dict() for c in run.components},
                "parallel_layout": checkpointing.parallel_layout(),
                "model": self.signature}

    def save(self, state, run) -> None:
        run.timers("checkpoint").start()
        path = checkpointing.save_checkpoint(
            self.cfg.save, state.iteration, run.gpt, run.optimizer, self._loop_state(state, run),
            save_optim=not self.cfg.no_save_optim)
        run.timers("checkpoint").stop()
        self.last_path = str(path)
        self.log.announce(f"saved checkpoint at iteration {state.iteration} to {path}")

    def resume(self, state, run, keep_batch: bool) -> None:
        """Load ``--load`` into the model, optimizer, state, data and components."""
        loop = checkpointing.load_checkpoint(
            self.cfg.load, run.gpt, run.optimizer, load_optim=not self.cfg.no_load_optim,
            signature=self.signature)
        saved = loop["train_state"]
        try:
            state.load_state_dict(saved, keep_batch=keep_batch)
        except BatchSplitError as e:
            raise checkpointing.CheckpointMismatch(
                f"--load {self.cfg.load}: {e}; resume with a data-parallel size that divides "
                f"it, or set --global-batch-size/--micro-batch-size") from None
        if keep_batch and saved["global_batch_size"] != state.global_batch_size:
            self.log.announce(f"resuming with global batch {state.global_batch_size} "
                              f"(the checkpoint ran {saved['global_batch_size']})")
        run.data.load_state_dict(loop["data"])
        saved_components = loop.get("components", {})
        for component in run.components:
            if component.name in saved_components:
                component.load_state_dict(saved_components[component.name])


__all__ = ["Checkpointer"]
