"""Dynamic global batch as a training-loop component (``--batch-growth``).

Main API: ``BatchGrowthComponent(config, initial_global_batch, planner, b_simple, log)``.

After every step it shows the controller where the run stands (from the train state) and,
when the controller grows the batch, asks the state to use the new global batch with the
planner's micro-batch from the next step on; ``lr_factor(state)`` is the ``--lr-scaling``
factor of the current batch, which the LR schedule multiplies in. The controller, the LR
scaler and their checkpoint state are this component's; the batch itself is the state's.
Imports no torch or Megatron (only a ramp imports megatron-core, see ``ramp.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

from megatron_ext.training.hooks import Component

from .config import BatchGrowthConfig
from .controller import BatchController, Progress
from .lr_scaling import LRScaler


class BatchGrowthComponent(Component):
    """Grows the global batch between steps; never shrinks it."""

    name = "batch_growth"

    def __init__(self, config: BatchGrowthConfig, initial_global_batch: int, planner,
                 b_simple: Callable[[], Optional[float]], log, granularity: int = 1):
        """``planner``: a BatchPlanner (valid batches, micro-batch split, step-time model);
        ``b_simple``: the current noise-scale estimate (None without one); ``log``: the
        run's MetricsLogger (its ``growth`` line announces a decision)."""
        self.config = config
        self.controller = BatchController(config, initial_global_batch, planner,
                                          granularity=granularity)
        self.lr_scaler = LRScaler(config.lr_scaling, initial_global_batch)
        self._b_simple = b_simple
        self.log = log
        self.lr_fraction: Callable[[], float] = lambda: 1.0
        """The LR schedule's current LR / peak (set by the session once the schedule exists)."""

    def describe(self) -> str:
        return f"batch growth: {self.config.batch_growth}, lr scaling: {self.config.lr_scaling}"

    def lr_factor(self, state) -> float:
        return self.lr_scaler.factor(state.global_batch_size, self._b_simple())

    def after_step(self, state, step_time_s: float) -> None:
        progress = Progress(state.iteration, state.consumed_samples, state.consumed_tokens,
                            state.global_batch_size, self.lr_fraction())
        new = self.controller.step(progress, self._b_simple(), step_time_s)
        if new is None:
            return
        plan = self.controller.plan(new)
        state.set_batch(new, plan.micro_batch_size if plan is not None else state.micro_batch_size)
        decision = self.controller.last_decision
        self.log.growth(state.iteration, new, plan, decision.reason if decision else "")

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(),
                "lr_scaler": self.lr_scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.lr_scaler.load_state_dict(state["lr_scaler"])


__all__ = ["BatchGrowthComponent"]
