"""Gradient-noise-scale measurement as a training-loop component (``--gns``).

Main API: ``GNSComponent(config)`` with ``model_options()`` (what the model builder swaps in
through the layer spec), ``attach(model_chunks, transformer_config)``, the step hooks, and
``b_simple`` (the current estimate, for batch growth and LR scaling).

Per measured step (every ``--gns-measure-interval``-th): ``on_step_start`` tells the tracker
the step's micro-batch split, the GNS layers report per-sample norms during backward, and
``after_backward`` (gradients reduced, not yet clipped by the optimizer) turns them into a
measurement of B_simple = tr(Σ)/|G|² (McCandlish et al. 2018). The x axis of the history is
the run's consumed tokens, read from the train state.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from megatron_ext.training.hooks import Component, ModelOptions

from .config import GNSConfig


def _finite(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


class GNSComponent(Component):
    """Measures B_simple on every ``gns_measure_interval``-th step."""

    name = "gns"

    def __init__(self, config: GNSConfig, log=None):
        from .tracker import GNSTracker

        self.config = config
        self.tracker = GNSTracker(config)
        self.log = log
        self.last = None  # the last GNSMeasurement
        self._measuring = False
        self._chunks = []

    # ------------------------------------------------------------------ model building
    def model_options(self) -> ModelOptions:
        from .layers import gns_layer_specs

        opts = ModelOptions(layer_specs=gns_layer_specs(self.tracker))
        if self.config.gns_include_embedding:
            from .embedding import GNSGPTModel

            opts.model_class, opts.model_kwargs = GNSGPTModel, {"gns_recorder": self.tracker}
        return opts

    def attach(self, model_chunks, transformer_config) -> None:
        """After DDP wrapping: find the tracked parameters, and read per-rank gradients and
        the global loss-token count inside megatron-core's ``finalize_model_grads``."""
        self.tracker.attach(model_chunks)
        self._chunks = list(model_chunks)
        transformer_config.finalize_model_grads_func = self.tracker.wrap_finalize_model_grads(
            transformer_config.finalize_model_grads_func)

    def describe(self) -> str:
        every = self.config.gns_measure_interval
        when = f", every {every} steps" if every > 1 else ""
        line = f"GNS: {self.config.gns_estimator} estimator{when} ({self.tracker.describe()})"
        if self.config.gns_estimator == "per-sample":
            line += f", --gns-route {self.config.gns_route}: {self._routes()}"
        return line

    def _routes(self) -> str:
        """The dW route of every GNS linear shape (on a GPU under `auto`: timed now, once)."""
        from .routes import model_routes

        try:  # the loop has pointed megatron's calculator at its batch shape by now
            from megatron.core import num_microbatches_calculator as nmc

            samples = nmc.get_micro_batch_size()
        except Exception:  # noqa: BLE001 - library use without the calculator
            samples = None
        seq = None
        for chunk in self._chunks:
            while hasattr(chunk, "module") and not hasattr(chunk, "max_sequence_length"):
                chunk = chunk.module
            seq = getattr(chunk, "max_sequence_length", seq)
        if not samples or not seq:
            return "chosen per layer shape at first use"
        return model_routes(self._chunks, self.tracker, seq, samples, self.config.gns_route)

    # ------------------------------------------------------------------ step hooks
    @property
    def b_simple(self) -> Optional[float]:
        return _finite(self.tracker.estimator.b_simple)

    def on_step_start(self, state) -> None:
        self._measuring = (state.iteration + 1) % self.config.gns_measure_interval == 0
        if self._measuring:
            self.tracker.begin_step(state.num_microbatches, state.micro_batch_size,
                                    state.global_batch_size)

    def after_backward(self, state) -> None:
        if self._measuring:  # tokens: consumed by the end of this step
            self.last = self.tracker.end_step(state.consumed_tokens + state.tokens_per_step)

    def after_step(self, state, step_time_s: float) -> None:
        if self.log is not None and self.last is not None \
                and state.iteration % (self.config.gns_log_interval or 1) == 0:
            self.log.gns(state.iteration, self.report(state))

    def metrics(self, state) -> Dict[str, float]:
        m = self.last
        if m is None:
            return {}
        return {"b_simple": float("nan") if m.b_simple is None else float(m.b_simple),
                "gns_grad_sq_norm": float(m.grad_sq_norm_ema),
                "gns_trace_sigma": float(m.trace_sigma_ema)}

    def report(self, state) -> Dict[str, float]:
        """B_simple, |G|² and tr(Σ) (EMAs) of the last measurement and the tokens so far."""
        m, est = self.last, self.tracker.estimator
        nan = float("nan")
        return {"gns/b_simple": nan if m.b_simple is None else float(m.b_simple),
                "gns/b_simple_raw": nan if m.b_simple_raw is None else float(m.b_simple_raw),
                "gns/grad_sq_norm": float(m.grad_sq_norm_ema),
                "gns/trace_sigma": float(m.trace_sigma_ema),
                "gns/tokens": float(state.consumed_tokens),
                "gns/skipped_samples": float(est.num_skipped_samples)}

    def finish(self, is_log_rank: bool) -> None:
        if not (is_log_rank and self.config.gns_plot):
            return
        from .plot import plot_dashboard

        steps = self.log.step_history() if self.log is not None else []
        if plot_dashboard(self.tracker.history, steps, self.config.gns_plot):
            self.log.announce(f"GNS dashboard written to {self.config.gns_plot}")

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)
        self.last = self.tracker.estimator.last  # what unmeasured steps keep reporting


__all__ = ["GNSComponent"]
