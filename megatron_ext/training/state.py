"""The one owner of where training stands: :class:`TrainState`.

Main API: ``TrainState(seq_length, global_batch_size, micro_batch_size, data_parallel_size)``
with ``advance()``, ``set_batch(global, micro)``, ``state_dict()`` / ``load_state_dict()``.

Iteration, consumed samples and tokens, the global batch and its split into micro-batches
live here and nowhere else: the sampler, the LR schedule, the batch controller, the GNS
estimator, the log and the checkpoint read them from this object, and only the batch-growth
component asks it to change the batch. megatron-core's micro-batch calculator is configured
from it (:func:`sync_microbatch_calculator`). Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional


class BatchSplitError(ValueError):
    """A global batch that the data-parallel size and micro-batch cannot split evenly."""


@dataclass
class TrainState:
    """Progress of the run (checkpointed) and the current batch shape."""

    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    iteration: int = 0
    """Completed optimizer steps."""
    consumed_samples: int = 0
    """Samples of all completed steps (the data stream's position)."""
    consumed_tokens: int = 0
    """Tokens of all completed steps (counted per step: --seq-length may change on resume)."""
    schedule_samples: Optional[float] = None
    """Where the LR schedule and a --train-samples budget stand, in samples: equal to
    ``consumed_samples`` except under ``--lr-scaling adascale``, where a step at gain r
    advances it by r initial batches (AdaScale's scale-invariant clock, Johnson et al. 2020,
    Algorithm 1), so a grown batch that is worth less than its size moves the schedule less."""

    def __post_init__(self):
        self._check_split(self.global_batch_size, self.micro_batch_size)
        if self.schedule_samples is None:  # (not given: the clock is the consumed samples)
            self.schedule_samples = float(self.consumed_samples)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step on each data-parallel rank (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def _check_split(self, global_batch: int, micro_batch: int) -> None:
        per_step = micro_batch * self.data_parallel_size
        if global_batch < 1 or micro_batch < 1 or global_batch % per_step:
            raise BatchSplitError(
                f"global batch {global_batch} cannot be split into micro-batches of "
                f"{micro_batch} over {self.data_parallel_size} data-parallel ranks: it must be "
                f"a positive multiple of {per_step}")

    def set_batch(self, global_batch: int, micro_batch: int) -> bool:
        """Use this batch from the next step on; True if it changed."""
        self._check_split(global_batch, micro_batch)
        changed = (global_batch, micro_batch) != (self.global_batch_size, self.micro_batch_size)
        self.global_batch_size, self.micro_batch_size = int(global_batch), int(micro_batch)
        return changed

    def advance(self, schedule_increment: Optional[float] = None) -> None:
        """One optimizer step at the current batch has completed; ``schedule_increment``:
        how far it moves the schedule clock (None: the global batch)."""
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        self.consumed_tokens += self.tokens_per_step
        self.schedule_samples += (self.global_batch_size if schedule_increment is None
                                  else schedule_increment)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "consumed_tokens": self.consumed_tokens,
                "schedule_samples": self.schedule_samples,
                "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: Dict[str, Any], keep_batch: bool = False) -> None:
        """Restore the progress; the batch too unless ``keep_batch`` (a fixed-batch run
        resumed with other batch flags uses the flags, as Megatron-LM does)."""
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_tokens = int(state.get("consumed_tokens",
                                             self.consumed_samples * self.seq_length))
        # (checkpoints from before the schedule clock: it was the consumed samples)
        self.schedule_samples = float(state.get("schedule_samples", self.consumed_samples))
        if not keep_batch:
            self.set_batch(int(state["global_batch_size"]), int(state["micro_batch_size"]))


def sync_microbatch_calculator(state: TrainState) -> None:
    """Point megatron-core's global micro-batch calculator at the state's batch shape (a no-op
    when it already matches), so megatron code that asks it sees the batch the loop runs."""
    import torch.distributed as dist
    from megatron.core import num_microbatches_calculator as nmc

    shape = (state.global_batch_size, state.micro_batch_size)
    if (nmc.get_current_global_batch_size(), nmc.get_micro_batch_size()) != shape:
        nmc.reconfigure_num_microbatches_calculator(
            dist.get_rank(), None, state.global_batch_size, state.micro_batch_size,
            state.data_parallel_size)


__all__ = ["TrainState", "BatchSplitError", "sync_microbatch_calculator"]
