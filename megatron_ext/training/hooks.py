"""The narrow interface through which features plug into the training loop.

Main API: :class:`Component` (no-op hooks to override), :func:`call_hooks` and
:class:`ModelOptions` (what a feature swaps into the model through the layer spec).

One optimizer step, as the loop runs it (``state`` is the
:class:`~megatron_ext.training.state.TrainState`)::

    on_step_start(state)          before forward/backward of the step at state.iteration + 1
    after_backward(state)         gradients are final (reduced over DP), the optimizer has not
                                  clipped or applied them yet
    after_step(state, step_time)  the step is done and state.advance() has counted it
    metrics(state)                numbers for this step's progress line / scalars

plus ``describe()`` (one startup line), ``finish(is_log_rank)`` at the end and
``state_dict()`` / ``load_state_dict()`` for checkpoints. A component owns its own state
and reads the run's progress from ``state``; the only write it may make to the state is
``state.set_batch`` (the batch-growth component). Components live in their feature's
package: :class:`megatron_ext.gns.component.GNSComponent`,
:class:`megatron_ext.batch_growth.component.BatchGrowthComponent`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional


class Component:
    """A feature with hooks into the training step; every hook is optional."""

    name = "component"

    def describe(self) -> Optional[str]:
        return None

    def on_step_start(self, state) -> None:
        pass

    def after_backward(self, state) -> None:
        pass

    def after_step(self, state, step_time_s: float) -> None:
        pass

    def metrics(self, state) -> Dict[str, float]:
        return {}

    def finish(self, is_log_rank: bool) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass
class ModelOptions:
    """How a feature changes the model it is built into (see ``training.model.build_model``)."""

    layer_specs: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``get_gpt_layer_spec`` (``column_linear``, ``row_linear``, ``norm``)."""
    model_class: Optional[type] = None
    """A GPTModel subclass to build instead of megatron-core's (None: GPTModel)."""
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments of ``model_class``."""


def call_hooks(components: Iterable[Component], hook: str, *args) -> None:
    """Call ``hook(*args)`` on every component, in order."""
    for component in components:
        getattr(component, hook)(*args)


__all__ = ["Component", "ModelOptions", "call_hooks"]
