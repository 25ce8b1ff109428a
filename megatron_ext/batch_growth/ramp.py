"""Megatron's batch-size ramp (`--rampup-batch-size START INCREMENT SAMPLES`) as a function.

Main API: `megatron_rampup(start, increment, samples, final) -> Callable[[int], int]`, the
global batch megatron-core's `RampupBatchsizeNumMicroBatchesCalculator` runs after a number
of consumed samples. We call megatron-core's calculator instead of re-deriving its schedule,
so `--batch-growth ramp` is Megatron's open-loop ramp to the sample. megatron-core is
imported only when a ramp is built; the rest of the package stays pure Python.
"""
from __future__ import annotations

from typing import Callable


def megatron_rampup(start: int, increment: int, samples: int, final: int) -> Callable[[int], int]:
    """consumed samples -> the ramp's global batch (start ... final, never rounded: the
    controller rounds to a batch the parallel layout can split)."""
    if start >= final:
        return lambda consumed_samples: final
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    # Micro-batch 1 and DP 1: the raw schedule, no divisibility rounding; rank -1: silent.
    calc = RampupBatchsizeNumMicroBatchesCalculator(
        final, 1, 1, False, -1, start, increment, samples)

    def target(consumed_samples: int) -> int:
        calc.update(int(consumed_samples), consistency_check=False)
        return calc.get_current_global_batch_size()

    return target
