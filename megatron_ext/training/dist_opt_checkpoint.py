"""Checkpoints of megatron-core's distributed optimizer (``--use-distributed-optimizer``,
``--dp-reduction hierarchical``) with megatron-core 0.16.1.

Main API: :data:`METADATA` (the format: state per parameter, so any DP layout and any number
of optimizer instances loads it), :func:`check_optimizer_kind`, :func:`allocate_state`
(before building the state dict to load into) and :func:`load_optimizer_state`.
"""
from __future__ import annotations

from typing import Any, Dict

from megatron.core import dist_checkpointing

from megatron_ext.training.errors import CheckpointMismatch

#: How the distributed optimizer's state is saved (megatron-core's fully reshardable format).
METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", None) or [optimizer])


def check_optimizer_kind(optimizer, ckpt_dir: str) -> None:
    """Same optimizer kind (distributed or not) as the checkpoint's, or one line."""
    keys = dist_checkpointing.load_tensors_metadata(ckpt_dir).keys()
    if not any(k.startswith("optimizer.state.") for k in keys):
        return  # no optimizer state saved: dist_checkpointing names what is missing
    saved = any(k.startswith("optimizer.state.param.") for k in keys)
    if saved != is_distributed(optimizer):
        kinds = {True: "the distributed optimizer (--use-distributed-optimizer or "
                       "--dp-reduction hierarchical)",
                 False: "the plain optimizer (--dp-reduction flat without "
                        "--use-distributed-optimizer)"}
        raise CheckpointMismatch(
            f"--load {ckpt_dir} holds the optimizer state of {kinds[saved]} but this run uses "
            f"{kinds[not saved]}: use the checkpoint's kind, or --no-load-optim for fresh "
            f"optimizer moments")


def allocate_state(optimizer) -> None:
    """megatron-core's DistributedOptimizer reads the torch optimizer's ``step`` to describe
    its state, which a fresh one has not got (no step yet): give it megatron-core's dummy
    state first (one zero-gradient step), which the load then overwrites."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, except for megatron-core 0.16.1's distributed optimizer
    over torch's Adam (no apex/TE): its loader copies every entry of a shard's torch state,
    which holds a per-parameter ``step`` that the saved tensors do not (the step comes back
    from the param groups). The step is set aside while the tensors are copied."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if len(chained) != 1 or not is_distributed(optimizer) or \
            state.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state)
        return
    opt, state = chained[0], dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    opt.load_state_dict(state)  # param groups, step, grad scaler
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step
