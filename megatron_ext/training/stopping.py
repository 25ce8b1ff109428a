"""When the run stops: every stop condition in one place.

Main API: ``StopConditions(training_config, device)`` with ``before_start(state)`` and
``after_step(state)``, each returning a reason (a short string for the log) or None.

Reasons: the run is complete (``--train-iters`` steps, or ``--train-samples`` consumed),
``--exit-interval``, or SIGTERM/SIGINT on any rank (``scancel``, Kubernetes, Ctrl-C). A
signal only sets a flag; ranks agree on it after each step (one all-reduce), so all of them
stop, and save, after the same step.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch

from megatron_ext.training.config import TrainingConfig


class StopConditions:
    def __init__(self, cfg: TrainingConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def _agreed_signal(self) -> bool:
        """True on every rank if any rank got a signal (the checkpoint's collectives need
        every rank at the same step)."""
        flag = torch.tensor([int(self.signalled)], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signalled = bool(flag.item())
        return self.signalled

    def _complete(self, state) -> Optional[str]:
        if self.cfg.train_samples is not None and state.consumed_samples >= self.cfg.train_samples:
            return f"--train-samples {self.cfg.train_samples} consumed"
        if state.iteration >= self.cfg.train_iters:
            return f"--train-iters {self.cfg.train_iters} done"
        return None

    def before_start(self, state) -> Optional[str]:
        """A resumed run that has nothing left to do."""
        return self._complete(state)

    def after_step(self, state) -> Optional[str]:
        if self._agreed_signal():
            return "stop requested (signal)"
        every = self.cfg.exit_interval
        if every and state.iteration % every == 0:
            return f"--exit-interval {every}"
        return self._complete(state)


__all__ = ["StopConditions"]
