"""Hooks of megatron_ext's features into the training loop.

Main API: :func:`build_extensions` -> :class:`Extensions`.

The loop calls the same hooks whether a feature is on or off, so a run with ``--gns`` or
``--batch-growth`` follows exactly the code path of a plain run plus the feature's own work:

* token-based LR schedule (warmup/decay counted in tokens, so they stay right while the
  global batch changes) times the ``--lr-scaling`` factor of the current batch;
* gradient noise scale (``--gns``): GNS-aware layers in the spec, a tracker that turns
  per-sample gradient norms into B_simple before the optimizer clips the gradients;
* dynamic global batch (``--batch-growth``): a controller that picks the next global batch
  after each step, through a topology-aware planner.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Dict, Optional

import torch

from megatron_ext.batch_growth.lr_scaling import LRScaler, TokenLRSchedule

logger = logging.getLogger(__name__)


def _float(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


class Extensions:
    def __init__(self, args: argparse.Namespace, cfgs: Dict[str, Any], vocab_size: int):
        self.args = args
        self.vocab_size = vocab_size
        self.gns_cfg = cfgs["gns"]
        self.growth_cfg = cfgs["growth"]
        self.schedule = TokenLRSchedule(
            max_lr=args.lr, min_lr=args.min_lr,
            warmup_tokens=args.lr_warmup_samples * args.seq_length,
            decay_tokens=args.lr_decay_samples * args.seq_length,
            style=(args.lr_decay_style if args.lr_decay_samples > args.lr_warmup_samples
                   else "constant"),
        )
        self.lr_scaler = LRScaler(self.growth_cfg.lr_scaling, args.global_batch_size)
        self.tracker = None
        self.linear_classes = None
        self.norm_class = None
        if self.gns_cfg.gns:
            from megatron_ext.gns.layers import gns_layer_classes

            self.linear_classes, self.norm_class = gns_layer_classes()
        self.controller = None
        self.current_batch = args.global_batch_size
        self.current_micro = args.micro_batch_size
        self._last_measurement = None
        self._measure_now = False

    # ------------------------------------------------------------------ set-up
    def wrap_finalize(self, finalize_fn):
        """The GNS tracker reads per-rank gradients inside ``finalize_model_grads`` (before
        the data-parallel reduction); the tracker itself is built later, in :meth:`attach`."""
        if not self.gns_cfg.gns:
            return finalize_fn
        from megatron_ext.gns.tracker import wrap_finalize_model_grads

        return wrap_finalize_model_grads(finalize_fn, lambda: self.tracker)

    def attach(self, ddp_model) -> None:
        from megatron.core import parallel_state as ps

        if self.gns_cfg.gns:
            from megatron_ext.gns.tracker import GNSTracker

            self.tracker = GNSTracker(self.gns_cfg, [ddp_model], seq_length=self.args.seq_length)
        if self.growth_cfg.batch_growth != "off":
            from megatron_ext.training.growth import build_controller

            self.controller = build_controller(self.args, self.growth_cfg,
                                               ps.get_data_parallel_world_size(), self.vocab_size)

    def describe(self) -> str:
        parts = [f"lr schedule: {self.schedule.style} over tokens"]
        if self.tracker is not None:
            every = self.gns_cfg.gns_measure_interval
            when = f", every {every} steps" if every > 1 else ""
            parts.append(f"GNS: {self.gns_cfg.gns_estimator} estimator{when} "
                         f"({self.tracker.describe()})")
        if self.controller is not None:
            parts.append(f"batch growth: {self.growth_cfg.batch_growth}, lr scaling: "
                         f"{self.growth_cfg.lr_scaling}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ per step
    def begin_step(self, iteration: int, num_microbatches: int, micro_batch_size: int,
                   global_batch: int) -> None:
        """`iteration`: the 1-based number of the step about to run."""
        self._measure_now = (self.tracker is not None
                             and iteration % self.gns_cfg.gns_measure_interval == 0)
        if self._measure_now:
            self.tracker.begin_step(num_microbatches, micro_batch_size, global_batch)

    def b_simple(self) -> Optional[float]:
        if self.tracker is None:
            return None
        b = self.tracker.estimator.b_simple
        return b if b is not None and math.isfinite(b) else None

    def learning_rate(self, tokens: int, global_batch: int) -> float:
        return self.schedule.lr(tokens) * self.lr_scaler.factor(global_batch, self.b_simple())

    def before_optimizer_step(self) -> None:
        """Measure the gradient noise scale before the optimizer clips the gradients."""
        if self.tracker is None:
            return
        # The estimator accumulates tokens itself: pass this step's tokens only.
        tokens = self.current_batch * self.args.seq_length
        if self._measure_now:
            self._last_measurement = self.tracker.end_step(tokens)
        else:  # --gns-measure-interval: megatron-core's own path ran; keep counting tokens
            self.tracker.estimator.advance_tokens(tokens)

    def after_step(self, iteration: int, tokens: int, step_time: float) -> None:
        if self.controller is None:
            return
        new = self.controller.step(iteration, tokens, self.b_simple(), step_time)
        if new is not None:
            plan = self.controller.current_plan()
            self.current_batch = int(new)
            if plan is not None:
                self.current_micro = int(plan.micro_batch_size)
            if torch.distributed.get_rank() == 0:
                d = self.controller.last_decision
                plan_desc = (f"micro {plan.micro_batch_size} x {plan.num_microbatches} "
                             f"accumulation x DP {plan.dp_size}, {plan.reduction} gradient "
                             f"reduction, predicted {plan.predicted_step_time_s * 1e3:.2f} ms/step"
                             if plan is not None else f"micro {self.current_micro}")
                print(f"> batch growth at iteration {iteration}: global batch -> "
                      f"{self.current_batch} ({plan_desc}); {d.reason if d else ''}", flush=True)

    def metrics(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        m = self._last_measurement
        if m is not None:
            out.update({"b_simple": _float(m.b_simple),
                        "gns_grad_sq_norm": float(m.grad_sq_norm_ema),
                        "gns_trace_sigma": float(m.trace_sigma_ema)})
        return out

    def gns_report(self, iteration: int) -> Optional[Dict[str, float]]:
        """Every ``--gns-log-interval`` steps: B_simple, |G|^2, tr(Sigma) (EMAs) and tokens."""
        m = self._last_measurement
        if m is None or iteration % self.gns_cfg.gns_log_interval:
            return None
        est = self.tracker.estimator
        return {
            "gns/b_simple": _float(m.b_simple),
            "gns/b_simple_raw": _float(m.b_simple_raw),
            "gns/grad_sq_norm": float(m.grad_sq_norm_ema),
            "gns/trace_sigma": float(m.trace_sigma_ema),
            "gns/tokens": float(est.tokens_seen),
            "gns/skipped_samples": float(est.num_skipped_samples),
        }

    def finish(self, is_log_rank: bool) -> None:
        if self.tracker is not None and is_log_rank and self.gns_cfg.gns_plot:
            from megatron_ext.gns.plot import plot_gns_history

            if plot_gns_history(self.tracker.history, self.gns_cfg.gns_plot):
                print(f"> GNS plot written to {self.gns_cfg.gns_plot}", flush=True)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {
            "current_batch": self.current_batch,
            "current_micro": self.current_micro,
            "lr_scaler": self.lr_scaler.state_dict(),
            "gns": self.tracker.state_dict() if self.tracker is not None else None,
            "controller": self.controller.state_dict() if self.controller is not None else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.current_batch = int(state["current_batch"])
        self.current_micro = int(state["current_micro"])
        self.lr_scaler.load_state_dict(state["lr_scaler"])
        if self.tracker is not None and state.get("gns") is not None:
            self.tracker.load_state_dict(state["gns"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])


def build_extensions(args: argparse.Namespace, cfgs: Dict[str, Any], vocab_size: int) -> Extensions:
    return Extensions(args, cfgs, vocab_size)
