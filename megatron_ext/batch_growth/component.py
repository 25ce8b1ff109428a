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
        self.planner = planner
        self._step_times = None  # (predicted before the step was measured, measured) seconds
        self._gain: Optional[float] = None  # AdaScale's r of the last step
        self.lr_fraction: Callable[[], float] = lambda: 1.0
        """The LR schedule's current LR / peak (set by the session once the schedule exists)."""

    def describe(self) -> str:
        return (f"batch growth: {self.config.batch_growth}, lr scaling: {self.config.lr_scaling}"
                + (f"; {self.planner.describe()}" if self.planner is not None else ""))

    def lr_factor(self, state) -> float:
        return self.lr_scaler.factor(state.global_batch_size, self._b_simple())

    def schedule_increment(self, lr_factor: float) -> Optional[float]:
        """AdaScale advances its schedule by the gain r = ``lr_factor`` base batches per step
        (Johnson et al. 2020, Algorithm 1: tau += r), not by the batch's size; other rules
        leave the clock on the consumed samples (None)."""
        if self.config.lr_scaling != "adascale":
            return None
        self._gain = lr_factor
        return lr_factor * self.lr_scaler.base_global_batch

    def after_step(self, state, step_time_s: float) -> None:
        progress = Progress(state.iteration, state.consumed_samples, state.consumed_tokens,
                            state.global_batch_size, self.lr_fraction())
        if self.planner is not None:  # prediction first, so its error shows in metrics()
            mbs, m = state.micro_batch_size, state.num_microbatches
            self._step_times = (self.planner.predict_step_time(mbs, m), step_time_s)
            self.planner.observe(mbs, m, step_time_s)
        new = self.controller.step(progress, self._b_simple(), step_time_s)
        if new is None:
            return
        plan = self.controller.plan(new)
        state.set_batch(new, plan.micro_batch_size if plan is not None else state.micro_batch_size)
        decision = self.controller.last_decision
        self.log.growth(state.iteration, new, plan, decision.reason if decision else "")

    def metrics(self, state) -> dict:
        """The planner's step time predicted before the last step ran, beside the measured."""
        m = {}
        if self._gain is not None:  # the clock the LR schedule and --train-samples run on
            m = {"adascale_gain": self._gain, "schedule_samples": state.schedule_samples,
                 "schedule_step_samples": self._gain * self.lr_scaler.base_global_batch}
        pred, measured = self._step_times or (None, None)
        if pred is None or not measured:
            return m
        return {**m, "predicted_step_time_ms": pred * 1e3,
                "measured_step_time_ms": measured * 1e3,
                "step_time_prediction_error": pred / measured - 1.0}

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(),
                "lr_scaler": self.lr_scaler.state_dict(),
                "step_time": self.planner.step_time.state_dict() if self.planner else None}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.lr_scaler.load_state_dict(state["lr_scaler"])
        if self.planner is not None and state.get("step_time"):
            self.planner.load_step_time(state["step_time"])


__all__ = ["BatchGrowthComponent"]
