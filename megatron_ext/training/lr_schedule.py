"""Learning rate of each step: megatron-core's ``OptimizerParamScheduler`` counted in samples.

Main API: ``LRSchedule(schedule_config, optimizer)`` with ``apply(state, factor) -> lr``.

Megatron-LM runs sample-based schedules (``--lr-warmup-samples``, ``--lr-decay-samples``) by
stepping the scheduler by the global batch after every step; that is exactly what a growing
batch needs, so warmup and decay stay right whatever the batch does (warmup and decay counted
in samples of a fixed --seq-length are counted in tokens). Here the scheduler's step counter is
not kept on its own: :meth:`LRSchedule.apply` steps it by the samples consumed since its last
call, read from the :class:`~megatron_ext.training.state.TrainState`, so after a resume it is
where the state says without being checkpointed. The scheduler also sets each parameter
group's weight decay (``wd_mult`` 0 for biases and norm parameters, as in Megatron-LM).

``factor`` is the batch-growth LR scaling (``--lr-scaling``) of the current batch; it
multiplies the scheduled LR of every group.
"""
from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.training.config import OptimizerSettings, ScheduleConfig


class LRSchedule:
    """Warmup then constant/linear/cosine decay to ``--min-lr``, over consumed samples."""

    def __init__(self, cfg: ScheduleConfig, optimizer_cfg: OptimizerSettings, optimizer):
        warmup, decay = cfg.lr_warmup_samples, cfg.lr_decay_samples
        # Megatron's scheduler needs decay > warmup; a decay no longer than the warmup can
        # only mean "warm up, then stay at --lr".
        style = cfg.lr_decay_style if decay > warmup else "constant"
        self.style = style
        self.scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=max(decay, warmup + 1),
            lr_decay_style=style, start_wd=optimizer_cfg.weight_decay,
            end_wd=optimizer_cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        self.optimizer = optimizer

    def apply(self, state, factor: float = 1.0) -> float:
        """Set every group's LR and weight decay for the step about to run (at
        ``state.consumed_samples``) and return the LR of the default group."""
        self.scheduler.step(increment=state.consumed_samples - self.scheduler.num_steps)
        groups = self.optimizer.param_groups
        for group in groups:
            group["lr"] *= factor * group.get("lr_mult", 1.0)
        # megatron-core marks the groups that follow the default schedule ("default_config")
        return next((g["lr"] for g in groups if g.get("default_config")), groups[0]["lr"])

    def describe(self) -> str:
        return f"lr schedule: {self.style} over samples (megatron-core OptimizerParamScheduler)"


__all__ = ["LRSchedule"]
