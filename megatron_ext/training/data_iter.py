"""Training/validation data for the loop: datasets, exact sampling, forward step and loss.

Main API: :class:`TrainData`.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Dict, List, Optional

import torch

from megatron.core import parallel_state as ps

from megatron_ext.data import GlobalBatchSampler, build_gpt_datasets, build_tokenizer, collate_micro_batch
from megatron_ext.training.model import padded_vocab_size


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


def _global_mean(total: torch.Tensor) -> float:
    """Per-token mean from this rank's ``[loss sum, token count]``, summed over DP x CP."""
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


class TrainData:
    """Datasets, the global-batch sampler and the per-micro-batch forward step."""

    def __init__(self, args: argparse.Namespace, data_config, device: str):
        self.args = args
        self.device = device
        self.cp_size = args.context_parallel_size
        self.local_seq_length = args.seq_length // self.cp_size
        tokenizer = build_tokenizer(data_config.tokenizer_type, data_config.vocab_size)
        self.vocab_size = tokenizer.vocab_size
        self.padded_vocab_size = padded_vocab_size(
            self.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
        max_batch = max(args.global_batch_size, getattr(args, "batch_growth_max", None) or 0)
        train_samples = args.train_samples or args.train_iters * max_batch
        eval_runs = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
        valid_samples = args.eval_iters * args.global_batch_size * eval_runs
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            data_config, args.seq_length, args.seed, train_samples, valid_samples, 0)
        self.has_valid = self.valid_ds is not None and args.eval_iters > 0
        # All CP ranks of a DP rank read the same samples, then keep their sequence chunks.
        self.sampler = GlobalBatchSampler(
            len(self.train_ds), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        self.consumed_samples = 0
        source = (f"--data-path {' '.join(data_config.data_path)} ({tokenizer!r})"
                  if data_config.data_path else (
            "mock data" if data_config.mock_data else
            f"default corpus ({data_config.default_corpus_mb:g} MB of Python stdlib sources, "
            "byte tokenizer)"))
        self.description = (f"{source}; {len(self.train_ds)} train samples of {args.seq_length} "
                            f"tokens; vocab {self.vocab_size} padded to {self.padded_vocab_size}")

    @property
    def consumed_tokens(self) -> int:
        return self.consumed_samples * self.args.seq_length

    def _prepare(self, dataset, indices: List[int]) -> Dict[str, torch.Tensor]:
        batch = collate_micro_batch(dataset, indices)  # [b, s] each
        if self.cp_size > 1:
            from megatron_ext.model.ring_attention import split_batch_for_context_parallel

            batch = split_batch_for_context_parallel(
                batch, ps.get_context_parallel_rank(), self.cp_size)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_step(self, global_batch: int, micro_batch: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch (advances the sampler)."""
        indices = self.sampler.next_global_batch(global_batch, micro_batch)
        return [self._prepare(self.train_ds, idx) for idx in indices]

    def advance(self, global_batch: int) -> None:
        self.consumed_samples += global_batch

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    def reduce_loss(self, losses: List[Dict[str, torch.Tensor]]) -> Optional[float]:
        """Mean per-token loss of the global batch on the last stage; None elsewhere."""
        if not ps.is_pipeline_last_stage():
            return None
        return _global_mean(torch.stack([x["lm loss"] for x in losses]).sum(0))

    @torch.no_grad()
    def evaluate(self, forward_backward, model, eval_iters: int) -> Optional[float]:
        """Mean loss over the first ``eval_iters`` global batches of the validation split."""
        args = self.args
        sampler = GlobalBatchSampler(len(self.valid_ds), ps.get_data_parallel_rank(),
                                     ps.get_data_parallel_world_size())
        model.eval()
        totals = []
        for _ in range(eval_iters):
            micro = [self._prepare(self.valid_ds, idx) for idx in
                     sampler.next_global_batch(args.global_batch_size, args.micro_batch_size)]
            out = forward_backward(
                forward_step_func=self.forward_step, data_iterator=iter(micro), model=[model],
                num_microbatches=len(micro), seq_length=self.local_seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True)
            if ps.is_pipeline_last_stage():
                totals.append(torch.stack([x["lm loss"] for x in out]).sum(0))
        model.train()
        return _global_mean(torch.stack(totals).sum(0)) if totals else None

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.consumed_samples = int(state["consumed_samples"])
