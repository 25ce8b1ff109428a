"""Learning rate of each step: megatron-core's ``OptimizerParamScheduler`` counted in samples.

Main API: ``LRSchedule(schedule_config, optimizer)`` with ``apply(state, factor) -> lr``.

Megatron-LM runs sample-based schedules (``--lr-warmup-samples``, ``--lr-decay-samples``) by
stepping the scheduler by the global batch after every step; that is exactly what a growing
batch needs, so warmup and decay stay right whatever the batch does (warmup and decay counted
in samples of a fixed --seq-length are counted in tokens). Here the scheduler's step counter is
not kept on its own: :meth:`LRSchedule.apply` steps it by the samples consumed since its last
call, read from the :class:`~megatron_ext.training.state.TrainState` (its schedule clock:
the consumed samples, or AdaScale's scale-invariant samples with ``--lr-scaling adascale``),
so after a resume it is where the state says without being checkpointed. The scheduler also sets each parameter
group's weight decay (``wd_mult`` 0 for biases and norm parameters, as in Megatron-LM).

``factor`` is the batch-growth LR scaling (``--lr-scaling``) of the current batch; it
multiplies the scheduled LR of every group.

On resume the checkpoint's schedule (peak and final LR, warmup and decay horizons, style)
wins over the flags unless ``--override-opt-param-scheduler`` (Megatron-LM's rule); either
way each differing value is one line in the log. Extending a run therefore keeps its LR
curve unless asked otherwise.
"""
from __future__ import annotations

from typing import List, Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.training.config import OptimizerSettings, ScheduleConfig


#: The schedule's values a checkpoint keeps, with the flag each comes from.
_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "lr_warmup_samples": "--lr-warmup-samples",
          "lr_decay_samples": "--lr-decay-samples", "lr_decay_style": "--lr-decay-style",
          "lr_wsd_decay_samples": "--lr-wsd-decay-samples"}


class LRSchedule:
    """Warmup then constant/linear/cosine/WSD decay to ``--min-lr``, over consumed samples."""

    def __init__(self, cfg: ScheduleConfig, optimizer_cfg: OptimizerSettings, optimizer):
        self.override = cfg.override_opt_param_scheduler
        self.values = {k: getattr(cfg, k) for k in _FLAGS}
        self.optimizer = optimizer
        self.scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=0,
            lr_decay_steps=1, lr_decay_style="constant", start_wd=optimizer_cfg.weight_decay,
            end_wd=optimizer_cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        self._configure()

    def _configure(self) -> None:
        """Point the scheduler and every param group at ``self.values``."""
        v, sched = self.values, self.scheduler
        warmup, decay = v["lr_warmup_samples"], v["lr_decay_samples"]
        # Megatron's scheduler needs decay > warmup; a decay no longer than the warmup can
        # only mean "warm up, then stay at --lr".
        self.style = v["lr_decay_style"] if decay > warmup else "constant"
        sched.max_lr, sched.min_lr, sched.lr_decay_style = v["lr"], v["min_lr"], self.style
        sched.lr_warmup_steps, sched.lr_decay_steps = warmup, max(decay, warmup + 1)
        # WSD: megatron-core's stable phase then a linear decay over the last samples
        wsd = v.get("lr_wsd_decay_samples") or max(1, (decay - warmup) // 5)
        sched.wsd_decay_steps, sched.lr_wsd_decay_style = min(wsd, decay - warmup or 1), "linear"
        for group in self.optimizer.param_groups:  # (a loaded optimizer state brings its own)
            group["max_lr"], group["min_lr"] = v["lr"], v["min_lr"]

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, saved: Optional[dict]) -> List[str]:
        """Continue the checkpoint's schedule (Megatron-LM's semantics), or with
        ``--override-opt-param-scheduler`` these flags'; returns one line per value that
        differs. ``saved`` None (older checkpoints): the flags."""
        notes = []
        constant = self.values["lr_decay_style"] == (saved or {}).get("lr_decay_style") == "constant"
        for key, flag in _FLAGS.items():
            old = (saved or {}).get(key, self.values[key])
            if old == self.values[key] or (constant and key in ("lr_decay_samples", "min_lr")):
                continue  # (a constant LR has no decay horizon and no final LR)
            if self.override:
                notes.append(f"{flag} {self.values[key]} replaces the checkpoint's {old} "
                             "(--override-opt-param-scheduler)")
            else:
                notes.append(f"{flag} {self.values[key]} differs from the checkpoint's {old}: "
                             "continuing the checkpoint's schedule (add "
                             "--override-opt-param-scheduler to use the flag)")
                self.values[key] = old
        self._configure()
        return notes

    def apply(self, state, factor: float = 1.0) -> float:
        """Set every group's LR and weight decay for the step about to run (at
        ``state.schedule_samples``: the consumed samples, or AdaScale's clock) and return the
        LR of the default group."""
        self.scheduler.step(increment=state.schedule_samples - self.scheduler.num_steps)
        groups = self.optimizer.param_groups
        for group in groups:
            group["lr"] *= factor * group.get("lr_mult", 1.0)
        # megatron-core marks the groups that follow the default schedule ("default_config")
        return next((g["lr"] for g in groups if g.get("default_config")), groups[0]["lr"])

    def fraction(self) -> float:
        """The scheduled LR of the current sample count over the peak --lr (before any
        batch-growth factor); read by the LR-aware batch-growth target."""
        return self.scheduler.get_lr({}) / self.values["lr"]

    def describe(self) -> str:
        return f"lr schedule: {self.style} over samples (megatron-core OptimizerParamScheduler)"


__all__ = ["LRSchedule"]
