"""Training and validation data of the loop: datasets, the forward step and the loss.

Main API: :class:`TrainData` (``next_step(state)``, ``reduce_loss``), :class:`Evaluator`
(``due(state)``, ``run(model)``; validation and test splits), :func:`forward_step` and
:func:`loss_func`.

The sample stream is a pure function of the train state: step k reads the global batch of
consecutive indices that starts at ``state.consumed_samples`` (``GlobalBatchSampler``), so no
sample is skipped or repeated when the global batch grows, and resuming needs nothing but the
state and the data phase (``data_phases.py``: which dataset, from which sample on), which the
checkpoint keeps.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional

import torch

from megatron.core import parallel_state as ps

from megatron_ext.data import GlobalBatchSampler, build_gpt_datasets, build_tokenizer, collate_micro_batch
from megatron_ext.training.errors import JobError
from megatron_ext.training.data_phases import (continue_phases, data_identity, phases_state,
                                               settle_length)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked per-token losses and the token count (megatron's per-token-loss form):
    the schedule and ``finalize_model_grads`` divide by the global token count, which is the
    exact mean over the global batch, also under context parallelism."""
    losses = output_tensor.float().reshape(-1)  # [b * s]
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron-core's forward step of a GPT micro-batch: per-token losses of the model,
    reduced by :func:`loss_func`."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _global_mean(total: torch.Tensor) -> float:
    """Per-token mean from this rank's ``[loss sum, token count]``, summed over DP x CP."""
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


def _describe_source(cfg, tokenizer) -> str:
    if cfg.data_path:
        return f"--data-path {' '.join(cfg.data_path)} ({tokenizer!r})"
    if cfg.mock_data:
        return "mock data"
    return (f"default corpus ({cfg.default_corpus_mb:g} MB of Python stdlib sources, "
            "byte tokenizer)")


def train_samples_needed(job) -> int:
    """Enough samples for the longest run the flags allow: the batch may grow to its max, and
    under AdaScale --train-samples is on a clock that a step of batch B <= max moves by at
    least the initial batch B0 (gain r >= 1), so at most samples x max / B0 are read."""
    t, g = job.training, job.batch_growth
    max_batch = max(t.global_batch_size, g.batch_growth_max or 0)
    if t.train_samples is None:
        return t.train_iters * max_batch
    if g.lr_scaling == "adascale":
        return -(-t.train_samples * max_batch // t.global_batch_size)
    return t.train_samples


class TrainData:
    """Datasets, the sampler and the per-micro-batch forward step of one job.

    ``saved``: the data state of the checkpoint the run resumes (``state_dict()``), and
    ``consumed``: its consumed samples; they decide the data phase (``data_phases.py``).
    """

    def __init__(self, job, device: str, saved: Optional[dict] = None, consumed: int = 0):
        cfg, t = job.data, job.training
        self.device = device
        self.seq_length = job.model.seq_length
        self.cp_size = job.cp
        self.local_seq_length = self.seq_length // self.cp_size
        self.tokenizer = tokenizer = build_tokenizer(cfg)
        self.vocab_size = tokenizer.vocab_size
        try:
            self.phases, self.notes = continue_phases(
                saved, data_identity(job), train_samples_needed(job), consumed,
                t.allow_seed_change)
        except ValueError as e:  # a seed change: one line, as for any unfitting checkpoint
            from megatron_ext.training.errors import CheckpointMismatch

            raise CheckpointMismatch(str(e)) from None
        # every evaluation reads the same first --eval-iters global batches of its split
        eval_samples = cfg.eval_iters * t.global_batch_size
        try:
            self.train_ds, self.valid_ds, self.test_ds = build_gpt_datasets(
                cfg, self.seq_length, t.seed, self.phases[-1].samples, eval_samples, eval_samples)
        except Exception as e:  # megatron-core: "Failed to write dataset materials ..."
            if "dataset materials" not in str(e):
                raise
            cause = " ".join(str(e.__cause__ or e).split())[:200]
            raise JobError(f"cannot write the dataset's sample-index cache ({cause}): free disk "
                           "space or point --data-cache-path at a writable directory") from None
        self.notes += settle_length(self.phases, len(self.train_ds), consumed)
        # All CP ranks of a DP rank read the same samples, then keep their sequence chunks.
        self.sampler = GlobalBatchSampler(len(self.train_ds), ps.get_data_parallel_rank(),
                                          ps.get_data_parallel_world_size())
        self.description = (f"{_describe_source(cfg, tokenizer)}; {len(self.train_ds)} train "
                            f"samples of {self.seq_length} tokens")

    def _prepare(self, dataset, indices: List[int]) -> Dict[str, torch.Tensor]:
        batch = collate_micro_batch(dataset, indices)  # [b, s] each
        if self.cp_size > 1:
            from megatron_ext.model.ring_attention import split_batch_for_context_parallel

            batch = split_batch_for_context_parallel(
                batch, ps.get_context_parallel_rank(), self.cp_size)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def micro_batches(self, dataset, sampler, consumed: int, global_batch: int, micro: int):
        return [self._prepare(dataset, idx)
                for idx in sampler.micro_batches(consumed, global_batch, micro)]

    def next_step(self, state) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step that starts at ``state.consumed_samples``
        (position ``consumed_samples - start`` of the current data phase)."""
        position = state.consumed_samples - self.phases[-1].start
        return self.micro_batches(self.train_ds, self.sampler, position,
                                  state.global_batch_size, state.micro_batch_size)

    forward_step = staticmethod(forward_step)

    def reduce_loss(self, losses: List[Dict[str, torch.Tensor]]) -> Optional[float]:
        """Mean per-token loss of the global batch on the last stage; None elsewhere."""
        if not ps.is_pipeline_last_stage() or not losses:
            return None
        return _global_mean(torch.stack([x["lm loss"] for x in losses]).sum(0))

    def state_dict(self) -> Dict[str, Any]:
        return phases_state(self.phases)


class Evaluator:
    """Mean loss over the first ``--eval-iters`` global batches of one split: the validation
    split every ``--eval-interval`` steps, the test split once at the end."""

    def __init__(self, job, data: TrainData, forward_backward, split: str = "valid"):
        cfg = job.data
        self.data, self.forward_backward, self.split = data, forward_backward, split
        self.dataset = data.valid_ds if split == "valid" else data.test_ds
        self.iters, self.interval = cfg.eval_iters, cfg.eval_interval
        self.global_batch, self.micro = job.training.global_batch_size, job.training.micro_batch_size
        self.enabled = self.dataset is not None and self.iters > 0
        if self.enabled:
            self.sampler = GlobalBatchSampler(len(self.dataset), ps.get_data_parallel_rank(),
                                              ps.get_data_parallel_world_size())

    def due(self, state) -> bool:
        return self.enabled and state.iteration % self.interval == 0

    @torch.no_grad()
    def run(self, model) -> Optional[float]:
        model.eval()
        totals = []
        for i in range(self.iters):
            micro = self.data.micro_batches(self.dataset, self.sampler, i * self.global_batch,
                                            self.global_batch, self.micro)
            out = self.forward_backward(
                forward_step_func=self.data.forward_step, data_iterator=iter(micro),
                model=[model], num_microbatches=len(micro),
                seq_length=self.data.local_seq_length, micro_batch_size=self.micro,
                forward_only=True)
            if ps.is_pipeline_last_stage():
                totals.append(torch.stack([x["lm loss"] for x in out]).sum(0))
        model.train()
        return _global_mean(torch.stack(totals).sum(0)) if totals else None


__all__ = ["Evaluator", "TrainData", "forward_step", "loss_func"]
