"""Exact sample accounting for a changing global batch: ``GlobalBatchSampler``, ``collate_micro_batch``.

Batch-size growth (issue 6, e.g. McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training": grow the batch as the gradient noise scale grows) changes the global batch between
optimizer steps. To keep the data stream identical to a fixed-batch run, the sampler treats the
dataset as one global stream: step k takes the next ``global_batch_size`` consecutive sample
indices starting at ``consumed_samples``, splits them contiguously across data-parallel ranks,
then into micro-batches. Whatever the batch schedule, after N samples exactly indices
0..N-1 were used once (modulo wrap-around), and ``consumed_samples`` alone is the resume state,
so a job may even resume with a different DP size.

Pure Python; torch is imported only by ``collate_micro_batch``.
"""
from __future__ import annotations

from typing import List, Sequence


class GlobalBatchSampler:
    """Hands this DP rank its micro-batches of dataset indices for each optimizer step.

    Args:
        total_samples: length of the (train) dataset the indices address.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        consumed_samples: samples already used by earlier steps (resume point).
        wrap_around: past the end, restart at index 0 and count an epoch; if False, raise.
    """

    def __init__(self, total_samples: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, wrap_around: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = int(total_samples)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)
        self.wrap_around = wrap_around
        self.steps = 0
        """Optimizer steps taken through this sampler (informational; survives state_dict)."""

    @property
    def epoch(self) -> int:
        """Completed passes over the dataset (the next sample lies in this epoch)."""
        return self.consumed_samples // self.total_samples

    def num_micro_batches(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Gradient-accumulation steps per optimizer step on each rank."""
        self._check(global_batch_size, micro_batch_size)
        return global_batch_size // (micro_batch_size * self.dp_size)

    def _check(self, global_batch_size: int, micro_batch_size: int) -> None:
        if micro_batch_size <= 0 or global_batch_size <= 0:
            raise ValueError(f"batch sizes must be > 0, got global {global_batch_size}, "
                             f"micro {micro_batch_size}")
        if global_batch_size % (micro_batch_size * self.dp_size) != 0:
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch "
                f"{micro_batch_size} x data-parallel size {self.dp_size}; pick a global batch "
                f"that is a multiple of {micro_batch_size * self.dp_size}")

    def next_global_batch(self, global_batch_size: int, micro_batch_size: int) -> List[List[int]]:
        """This rank's micro-batches (lists of dataset indices) for one step; advances the state."""
        n_micro = self.num_micro_batches(global_batch_size, micro_batch_size)
        start = self.consumed_samples
        if not self.wrap_around and start + global_batch_size > self.total_samples:
            raise RuntimeError(
                f"out of samples: step needs indices {start}..{start + global_batch_size - 1} but "
                f"the dataset has {self.total_samples}; build more train samples or allow wrap-around")
        per_rank = global_batch_size // self.dp_size
        first = start + self.dp_rank * per_rank  # contiguous block of this rank
        indices = [(first + i) % self.total_samples for i in range(per_rank)]
        self.consumed_samples += global_batch_size
        self.steps += 1
        return [indices[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(n_micro)]

    def state_dict(self) -> dict:
        """Resume state; ``consumed_samples`` is the only thing that steers the stream."""
        return {"consumed_samples": self.consumed_samples, "total_samples": self.total_samples,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (the DP size may differ from the saving run's)."""
        if int(state["total_samples"]) != self.total_samples:
            raise ValueError(
                f"checkpoint sampler addressed {state['total_samples']} samples but the dataset "
                f"now has {self.total_samples}; rebuild the dataset with the same size "
                "(same --train-samples/--seq-length/--data-path/--split/seed)")
        self.consumed_samples = int(state["consumed_samples"])
        self.steps = int(state.get("steps", 0))


def collate_micro_batch(dataset, indices: Sequence[int]) -> dict:
    """Stack GPTDataset samples into ``tokens``/``labels``/``position_ids`` [b, s] int64 and
    ``loss_mask`` [b, s] float32; ``attention_mask`` is left out (the model is causal)."""
    import torch

    samples = [dataset[int(i)] for i in indices]
    out = {}
    for key, dtype in (("tokens", torch.int64), ("labels", torch.int64),
                       ("loss_mask", torch.float32), ("position_ids", torch.int64)):
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(dtype)  # [b, s]
    return out
