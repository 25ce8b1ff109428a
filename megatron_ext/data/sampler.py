"""Exact sample accounting for a changing global batch: ``GlobalBatchSampler``, ``collate_micro_batch``.

Batch-size growth (issue 6, e.g. McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training": grow the batch as the gradient noise scale grows) changes the global batch between
optimizer steps. To keep the data stream identical to a fixed-batch run, the sampler treats the
dataset as one global stream: the step that starts at ``consumed_samples`` takes the next
``global_batch_size`` consecutive sample indices, split contiguously across data-parallel ranks,
then into micro-batches. Whatever the batch schedule, after N samples exactly indices 0..N-1
were used once (modulo wrap-around).

The sampler holds no position: the training loop owns the consumed-sample count (and saves it),
and every call is a pure function of it, so a resume, even with another DP size, needs nothing
from the sampler.

Pure Python; torch is imported only by ``collate_micro_batch``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence


@dataclass(frozen=True)
class GlobalBatchSampler:
    """This DP rank's micro-batches of dataset indices for the step at a given sample count.

    Args:
        total_samples: length of the (train) dataset the indices address.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        wrap_around: past the end, restart at index 0 (a new epoch); if False, raise.
    """

    total_samples: int
    dp_rank: int
    dp_size: int
    wrap_around: bool = True

    def __post_init__(self) -> None:
        if self.total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {self.total_samples}")
        if self.dp_size <= 0 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={self.dp_rank}, "
                             f"dp_size={self.dp_size}")

    def epoch(self, consumed_samples: int) -> int:
        """Completed passes over the dataset after ``consumed_samples`` (the next sample lies
        in this epoch)."""
        return _check_consumed(consumed_samples) // self.total_samples

    def num_micro_batches(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Gradient-accumulation steps per optimizer step on each rank."""
        if micro_batch_size <= 0 or global_batch_size <= 0:
            raise ValueError(f"batch sizes must be > 0, got global {global_batch_size}, "
                             f"micro {micro_batch_size}")
        if global_batch_size % (micro_batch_size * self.dp_size) != 0:
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch "
                f"{micro_batch_size} x data-parallel size {self.dp_size}; pick a global batch "
                f"that is a multiple of {micro_batch_size * self.dp_size}")
        return global_batch_size // (micro_batch_size * self.dp_size)

    def micro_batches(self, consumed_samples: int, global_batch_size: int,
                      micro_batch_size: int) -> List[List[int]]:
        """This rank's micro-batches (lists of dataset indices) for the step that starts after
        ``consumed_samples`` samples; the caller then adds ``global_batch_size`` to its count."""
        n_micro = self.num_micro_batches(global_batch_size, micro_batch_size)
        start = _check_consumed(consumed_samples)
        if not self.wrap_around and start + global_batch_size > self.total_samples:
            raise RuntimeError(
                f"out of samples: step needs indices {start}..{start + global_batch_size - 1} but "
                f"the dataset has {self.total_samples}; build more train samples or allow wrap-around")
        per_rank = global_batch_size // self.dp_size
        first = start + self.dp_rank * per_rank  # contiguous block of this rank
        indices = [(first + i) % self.total_samples for i in range(per_rank)]
        return [indices[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(n_micro)]


def _check_consumed(consumed_samples: int) -> int:
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
    return int(consumed_samples)


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
