"""A greedy continuation of a prompt: a sanity check at the end of a run (``--sample-prompt``).

Main API: :func:`greedy_sample` (collective over the ranks of the model; every rank calls it).

No KV cache: each new token runs the whole window (at most ``--seq-length`` tokens) through the
model, which is slow but exact and needs nothing beyond the training model. Tensor parallelism
works (the vocabulary shards are gathered); the window is padded at the end to a multiple of
TP, which a causal model does not look at. Pipeline and context parallelism are not supported
here (the job's validation says so in one line).
"""
from __future__ import annotations

from typing import List

import torch


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, length: int, seq_length: int, tp: int,
                  device: str) -> str:
    """The ``length`` tokens the model finds most likely after ``prompt``, as text."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    ids: List[int] = list(tokenizer.tokenize(prompt))
    first_new = len(ids)
    was_training = model.training
    model.eval()
    for _ in range(length):
        window = ids[-seq_length:]
        padded = window + [0] * (-len(window) % tp)  # sequence parallelism splits by TP
        tokens = torch.tensor([padded], dtype=torch.long, device=device)  # [1, s]
        positions = torch.arange(len(padded), device=device).unsqueeze(0)  # [1, s]
        logits = model(tokens, positions, None)  # [1, s, V / tp]
        logits = gather_from_tensor_model_parallel_region(logits)  # [1, s, V]
        next_id = int(logits[0, len(window) - 1, :tokenizer.vocab_size].argmax())
        ids.append(next_id)
    model.train(was_training)
    return tokenizer.detokenize(ids[first_new:])


__all__ = ["greedy_sample"]
