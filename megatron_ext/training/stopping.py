"""When the run stops: every stop condition in one place.

Main API: ``StopConditions(training_config, device)`` with ``before_start(state)``,
``after_step(state, save_seconds, step_seconds)`` (each returns a reason for the log, or
None), ``complete(state)`` and ``reason``.

Reasons: the run is complete (``--train-iters`` steps, or ``--train-samples`` on the schedule
clock: consumed samples, or AdaScale's); ``--exit-interval``; ``--exit-duration-in-mins``
(counted from the process start), which stops early enough that one more step (the longest so
far) and the final save still fit in the limit; SIGTERM, SIGINT or SIGUSR1 on any rank
(``scancel``, Kubernetes, Ctrl-C, SLURM's ``--signal=USR1@SECONDS`` ahead of the time limit).
A signal only sets a flag; ranks agree on the flags after each step (one all-reduce), so all of them stop,
and save, after the same step.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch

from megatron_ext.training.config import TrainingConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _process_start() -> float:
    """When this process started (wall clock): the job's clock, not the training loop's."""
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):
        return time.time()


class StopConditions:
    def __init__(self, cfg: TrainingConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.signalled: Optional[str] = None
        self.reason: Optional[str] = None
        self.start = _process_start()
        self._longest_step = 0.0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def complete(self, state) -> bool:
        """Nothing left to train (the budget is spent)."""
        t = self.cfg
        # (the schedule clock: consumed samples, or AdaScale's scale-invariant ones)
        return (t.train_samples is not None and state.schedule_samples >= t.train_samples) \
            or state.iteration >= t.train_iters

    def before_start(self, state) -> Optional[str]:
        """Why a resumed run has nothing to do, or None."""
        t = self.cfg
        if not self.complete(state):
            return None
        budget = (f"--train-samples {t.train_samples}" if t.train_samples is not None
                  else f"--train-iters {t.train_iters}")
        self.reason = (f"the checkpoint is at iteration {state.iteration} ({state.consumed_samples}"
                       f" samples), which completes {budget}: nothing to train (raise it to "
                       "continue the run)")
        return self.reason

    def _out_of_time(self, save_seconds: float, step_seconds: float) -> bool:
        """Would one more step plus the final save overrun --exit-duration-in-mins? A step is
        the longest measured so far (the step alone: not the start-up before the first one,
        nor a save or an evaluation between two, which would count the save twice)."""
        self._longest_step = max(self._longest_step, step_seconds)
        limit = self.cfg.exit_duration_in_mins
        return limit is not None and (time.time() - self.start + self._longest_step
                                      + save_seconds > 60.0 * limit)

    def _agreed(self, save_seconds: float, step_seconds: float) -> tuple:
        """(any rank signalled, any rank out of time), the same on every rank."""
        out_of_time = self._out_of_time(save_seconds, step_seconds)
        flags = torch.tensor([int(self.signalled is not None), int(out_of_time)],
                             dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def after_step(self, state, save_seconds: float = 0.0,
                   step_seconds: float = 0.0) -> Optional[str]:
        """``save_seconds``: the last save's duration; ``step_seconds``: this step's."""
        signalled, out_of_time = self._agreed(save_seconds, step_seconds)
        every = self.cfg.exit_interval
        if signalled:
            self.reason = f"stop requested ({self.signalled or 'signal on another rank'})"
        elif out_of_time:
            self.reason = (f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins:g}: "
                           "stopping while one more step and the save still fit")
        elif every and state.iteration % every == 0:
            self.reason = f"--exit-interval {every}"
        elif self.complete(state):
            budget = ("--train-samples" if self.cfg.train_samples is not None
                      else "--train-iters")
            self.reason = f"{budget} done"
        else:
            self.reason = None
        return self.reason


__all__ = ["StopConditions", "STOP_SIGNALS"]
