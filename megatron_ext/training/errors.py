"""Failures of a training step turned into one line a user can act on.

Main API: :func:`step_errors` (a context manager around forward/backward and the optimizer
step), :class:`TrainingDiverged`, :class:`OutOfMemory`.

megatron-core reports NaN/Inf gradients from deep inside DDP and PyTorch reports running out
of GPU memory with a long trace; the user needs the iteration, what happened, what to resume
from and which flags to turn.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch


class JobError(RuntimeError):
    """An expected failure of a run, with a one-line message that says what to do."""


class CheckpointMismatch(ValueError):
    """The checkpoint under --load does not fit this run (model, optimizer or format)."""


class TrainingDiverged(RuntimeError):
    """Non-finite gradients: training stops before the optimizer step touches the weights."""


class OutOfMemory(RuntimeError):
    """A step ran out of GPU memory (message: what was asked, the planner's view, knobs)."""


def diverged(e: RuntimeError, iteration: int, last_checkpoint: Optional[str]) -> TrainingDiverged:
    # megatron-core's DDP check: "... Unexpected result nan (message='found NaN in local grad
    # norm for bucket #0 ...')"; keep the part in quotes.
    msg = str(e)
    detail = msg.split("message='", 1)[-1].split(" in backward pass", 1)[0].rstrip("')")
    resume = (f"the last checkpoint is {last_checkpoint} (resume with --load)"
              if last_checkpoint else "no checkpoint was saved (see --save/--save-interval)")
    return TrainingDiverged(
        f"iteration {iteration}: non-finite gradients ({detail}); the weights were not "
        f"updated, {resume}. Lower --lr, set --clip-grad, or lengthen the warmup.")


def out_of_memory(e: Exception, iteration: int, advice: str) -> OutOfMemory:
    first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
    return OutOfMemory(f"iteration {iteration}: {first[:200].rstrip('.')}; {advice}")


@contextlib.contextmanager
def step_errors(iteration: int, last_checkpoint: Optional[str], oom_advice: Callable[[], str]):
    """Translate a step's OOM and NaN/Inf failures (``iteration``: the step being run)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:  # also Adam state, allocated at the first step
        raise out_of_memory(e, iteration, oom_advice()) from None
    except RuntimeError as e:
        if "Unexpected result" not in str(e):
            raise
        raise diverged(e, iteration, last_checkpoint) from None


__all__ = ["CheckpointMismatch", "JobError", "OutOfMemory", "TrainingDiverged", "diverged", "out_of_memory",
           "step_errors"]
