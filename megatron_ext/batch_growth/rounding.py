"""Which global batches a growing run may pick (pure Python).

Main API: ``BatchGrid(quantum, rounding)`` with ``contains(b)``, ``batches(lo, hi)``,
``round_down(target, current)``; ``snap_for_layout(batch, micro, dp)`` and
``resume_batch(saved_train_state, micro, dp)`` (a resume on another data-parallel size).

Why not any integer: a batch must split into whole micro-batches on every data-parallel
rank, and a prime batch (7, 11, 13, ...) only splits into micro-batches of 1, which wastes
the GPU (issue 13 saw the planner fall to micro-batch 1 at 11, 13, 17). A run can also be
resumed on another data-parallel size, where a batch valid on the old layout may not split.

``rounding="efficient"`` (default) allows quantum * n with n in {1, 2, 3, 4, 6, 8, 12, 16,
24, ...} (powers of two and three times powers of two): successive sizes differ by 1.33-2x,
so a change is always worth a re-plan, every size keeps the micro-batch and adds whole
accumulation steps, and with a quantum of micro-batch x data-parallel size every size stays
valid on half the ranks, and from 4 quanta on also on twice as many (an integer multiple
such as 5 or 7 quanta would not). ``rounding="any"`` allows every
multiple of the quantum (the behaviour before issue 13).
"""
from __future__ import annotations

import math
from typing import List, Optional

ROUNDING_RULES = ("efficient", "any")


def _efficient_multiplier(n: int) -> bool:
    """n = 2^a or 3 * 2^a."""
    if n < 1:
        return False
    while n % 2 == 0:
        n //= 2
    return n in (1, 3)


class BatchGrid:
    """The global batches a growing run may use: multiples of ``quantum`` (filtered by the
    rounding rule)."""

    def __init__(self, quantum: int, rounding: str = "efficient"):
        if quantum < 1:
            raise ValueError(f"batch quantum must be >= 1, got {quantum}")
        if rounding not in ROUNDING_RULES:
            raise ValueError(f"--batch-growth-rounding={rounding!r} is not one of "
                             f"{ROUNDING_RULES}")
        self.quantum, self.rounding = int(quantum), rounding

    def contains(self, batch: int) -> bool:
        if batch < 1 or batch % self.quantum:
            return False
        return self.rounding == "any" or _efficient_multiplier(batch // self.quantum)

    def batches(self, lo: int, hi: int) -> List[int]:
        """Grid sizes in [lo, hi], ascending."""
        first = max(1, -(-lo // self.quantum))
        return [self.quantum * n for n in range(first, hi // self.quantum + 1)
                if self.contains(self.quantum * n)]

    def round_down(self, target: float, current: int) -> Optional[int]:
        """Largest grid size in (current, target], or None."""
        if not math.isfinite(target):
            return None
        sizes = self.batches(current + 1, int(math.floor(target)))
        return sizes[-1] if sizes else None


def snap_for_layout(batch: int, micro_batch: int, dp_size: int) -> int:
    """Smallest batch >= ``batch`` that splits into micro-batches of ``micro_batch`` over
    ``dp_size`` ranks (a resume on a new data-parallel size: growth never shrinks)."""
    per_step = micro_batch * dp_size
    return -(-batch // per_step) * per_step


def resume_batch(saved: dict, micro_batch: int, dp_size: int):
    """A grown run's checkpointed train state (``global_batch_size``, ``micro_batch_size``)
    resumed on ``dp_size`` ranks with the flags' ``micro_batch``: returns ``(saved, note)``,
    unchanged with note None when the batch still splits, else with the batch snapped up
    to the next size that does (issue 13: batch 7 from DP=1 resumed on DP=2) and one line
    saying so."""
    batch, micro = int(saved["global_batch_size"]), int(saved["micro_batch_size"])
    if batch % (micro * dp_size) == 0:
        return saved, None
    if batch % (micro_batch * dp_size) == 0:
        return dict(saved, micro_batch_size=micro_batch), None
    snapped = snap_for_layout(batch, micro_batch, dp_size)
    note = (f"resuming the grown global batch {batch} as {snapped}: {batch} does not split "
            f"into micro-batches of {micro_batch} over {dp_size} data-parallel ranks")
    return dict(saved, global_batch_size=snapped, micro_batch_size=micro_batch), note


__all__ = ["BatchGrid", "ROUNDING_RULES", "resume_batch", "snap_for_layout"]
