"""Helpers of the tests that build and run a GPT the way training does (not a test module).

Every GPT comes from the product's builders: flags -> ``parse_job`` -> ``build_gpt`` (the
layer spec, weights initialised by name, DDP, ``finalize_model_grads``), run through
megatron-core's schedule with training's ``loss_func``.

Main API:

* ``one_rank_megatron(job)``: context manager, ``initialize_megatron(job)`` in a world of
  one (this process; for in-process pytest modules), everything torn down afterwards;
* ``build(job, vocab_size, options=None)``: ``build_gpt`` with ``vocab_size`` padded as
  training pads it (``job.model_shape(vocab).padded_vocab(job.tp)``);
* ``micro_batches(samples, micro_batch_size, loss_mask=None)``: token rows [n, s + 1] ->
  the micro-batch dicts of the training data (``collate_micro_batch``);
* ``forward_backward(ddp, batches, forward_only=False)``: megatron-core's schedule (and
  finalize) with training's ``forward_step`` over those micro-batches, returning its loss
  reports;
* ``mean_loss(losses)``: the per-token mean of those reports (this rank's tokens).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch

from launch import free_port

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def one_rank_megatron(job):
    """``initialize_megatron(job)`` as a world of one; yields the device type ("cpu"/"cuda").

    The rendezvous variables are set for the duration only (a test process must not leave
    RANK/WORLD_SIZE behind for the torchrun launches of later tests); on exit the
    micro-batch calculator, the parallel state and the process group are destroyed.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_ext.training.initialize import initialize_megatron

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        yield initialize_megatron(job)
    finally:
        destroy_num_microbatches_calculator()
        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(job, vocab_size: int, options=None):
    """The product's ``build_gpt`` of ``job`` for a tokenizer of ``vocab_size`` tokens."""
    from megatron_ext.training.model import build_gpt

    return build_gpt(job, job.model_shape(vocab_size).padded_vocab(job.tp), options)


def micro_batches(samples: torch.Tensor, micro_batch_size: int,
                  loss_mask: Optional[torch.Tensor] = None, device=None) -> List[Dict]:
    """Token rows ``samples`` [n, s + 1] (and a loss mask [n, s], default all ones) as the
    micro-batches training feeds its schedule: ``tokens``/``labels``/``loss_mask``/
    ``position_ids`` [b, s] each, stacked by the product's ``collate_micro_batch``."""
    from megatron_ext.data import collate_micro_batch

    n, s = samples.shape[0], samples.shape[1] - 1
    if loss_mask is None:
        loss_mask = torch.ones(n, s)
    rows = [{"tokens": samples[i, :-1], "labels": samples[i, 1:], "loss_mask": loss_mask[i],
             "position_ids": torch.arange(s)} for i in range(n)]
    if n % micro_batch_size:
        raise ValueError(f"{n} samples do not split into micro-batches of {micro_batch_size}")
    out = []
    for start in range(0, n, micro_batch_size):
        batch = collate_micro_batch(rows, range(start, start + micro_batch_size))
        out.append({k: v.to(device) if device is not None else v for k, v in batch.items()})
    return out


def forward_backward(ddp, batches: List[Dict], forward_only: bool = False):
    """megatron-core's schedule over ``batches`` (finalize_model_grads included unless
    ``forward_only``); returns its per-micro-batch loss reports (last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.training.data import forward_step

    b, s = batches[0]["tokens"].shape
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
        num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only)


def loss_totals(losses) -> torch.Tensor:
    """[masked loss sum, token count] of this rank's micro-batches (``loss_func`` reports)."""
    return torch.stack([x["lm loss"] for x in losses]).sum(0)


def mean_loss(losses) -> float:
    """Per-token mean loss of this rank's micro-batches."""
    total = loss_totals(losses)
    return float(total[0] / total[1])
