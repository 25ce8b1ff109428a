"""Per-sample gradient norms of the word embedding and the output layer (--gns-include-embedding).

Main API:
    GNSVocabParallelEmbedding   VocabParallelEmbedding whose backward reports ‖dE_i‖²
    GNSOutputLayer              the GPT output layer (ColumnParallelLinear over the vocab)
    convert_embedding_layers(gpt_model) -> list of tracked parameters

`GPTModel` builds these two modules itself (not through the layer spec), so the tracker
swaps their classes in place (`convert_embedding_layers`; the subclasses add no state).

Embedding: dE_i has one row per distinct token of sample i, the sum of the output grads of
that token's positions; rows of the local vocab shard are summed per (sample, token) with a
scatter (memory O(b·s·h), exact) and squared. Vocab shards are disjoint: additive over TP.

Tied embedding/output weight (Megatron's default, PP = 1): the per-sample gradient is
E_i + O_i (embedding part + output-layer part), so ‖g_i‖² = ‖E_i‖² + ‖O_i‖² + 2⟨E_i, O_i⟩.
The output layer's kernel gives ‖O_i‖²; for the cross term only the rows of O_i at the
sample's own tokens matter: O_i[tok_t] = Σ_t' dy[t', i, tok_t] x[t', i] (an [s, s] x [s, h]
GEMM per sample in the output layer's backward), and ⟨E_i, O_i⟩ = Σ_t ⟨dx[i, t], O_i[tok_t]⟩
in the embedding's backward, which runs later in the same micro-batch. With pipeline
parallelism the two halves live on different stages: not supported (untie the weights or
leave the embedding out).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from .layers import GNSColumnParallelLinear, _linear_impl, _tracker_mb


class _EmbeddingWithSampleNorms(torch.autograd.Function):
    """F.embedding on the local vocab shard; backward reports per-sample ‖dE_i‖² (+ cross)."""

    @staticmethod
    def forward(ctx, idx, weight, valid, tracker, mb, tied):  # idx, valid: [b, s]
        ctx.save_for_backward(idx, valid)
        ctx.tracker, ctx.mb, ctx.tied = tracker, mb, tied
        ctx.num_rows, ctx.w_dtype = weight.shape[0], weight.dtype
        out = F.embedding(idx, weight)  # [b, s, h]
        if valid is not None:
            out = out * valid.unsqueeze(-1).to(out.dtype)  # tokens of other vocab shards -> 0
        return out

    @staticmethod
    def backward(ctx, dy):  # [b, s, h]
        idx, valid = ctx.saved_tensors
        b, s, h = dy.shape
        dyf = dy.float()
        if valid is not None:
            dyf = dyf * valid.unsqueeze(-1)
        flat_idx, flat_dy = idx.reshape(-1), dyf.reshape(-1, h)
        grad_w = torch.zeros(ctx.num_rows, h, dtype=torch.float32, device=dy.device)
        grad_w.index_add_(0, flat_idx, flat_dy)
        # per-(sample, token) row sums -> squared row norms -> per-sample sums
        keys = (torch.arange(b, device=idx.device).unsqueeze(1) * ctx.num_rows + idx).reshape(-1)
        if valid is not None:
            keep = valid.reshape(-1)
            keys, flat_dy = keys[keep], flat_dy[keep]
        uniq, inv = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(uniq.numel(), h, dtype=torch.float32, device=dy.device)
        rows.index_add_(0, inv, flat_dy)
        sq = torch.zeros(b, dtype=torch.float64, device=dy.device)
        sq.index_add_(0, uniq // ctx.num_rows, rows.square().sum(-1).double())
        if ctx.tied:  # 2 <E_i, O_i> with the output layer's rows at this sample's tokens
            out_rows = ctx.tracker.pop_tied_rows(ctx.mb)  # [b, s, h] fp32
            sq += 2.0 * (dyf * out_rows).sum((1, 2)).double()
        ctx.tracker.add_sq_norms(ctx.mb, sq)
        return None, grad_w.to(ctx.w_dtype), None, None, None, None


class GNSVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding that reports per-sample squared grad norms to its tracker."""

    gns_tracker = None
    gns_tied = False

    def forward(self, input_):  # input_: [b, s] token ids
        mb = _tracker_mb(self) if self.weight.requires_grad else None
        if mb is None:
            return super().forward(input_)
        valid = None
        idx = input_
        if self.tp_group.size() > 1:
            valid = (input_ >= self.vocab_start_index) & (input_ < self.vocab_end_index)
            idx = (input_ - self.vocab_start_index).masked_fill(~valid, 0)
        if self.gns_tied:
            self.gns_tracker.set_tied_tokens(mb, idx, valid)
        out = _EmbeddingWithSampleNorms.apply(idx, self.weight, valid, self.gns_tracker, mb,
                                              self.gns_tied)  # [b, s, h]
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


def _tied_rows(x, dy, idx, valid):
    """O_i[tok_t] = Σ_t' dy[t', i, tok_t] x[t', i] for every sample i and position t.

    x: [s, b, h] output-layer input, dy: [s, b, V_local] logits grad, idx/valid: [b, s]
    local token ids of the same micro-batch. Returns [b, s, h] fp32 (0 where not valid).
    """
    s, b, h = x.shape
    out = torch.empty(b, idx.shape[1], h, dtype=torch.float32, device=x.device)
    for i in range(b):  # one [s, s] block at a time
        c = dy[:, i, :].index_select(1, idx[i]).float()  # [s', s]
        out[i] = c.t() @ x[:, i, :].float()
    if valid is not None:
        out *= valid.unsqueeze(-1)
    return out


class GNSOutputLayer(GNSColumnParallelLinear):
    """The GPT output layer; with tied weights it also prepares the cross term."""

    gns_tied = False

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = _tracker_mb(self)
        if mb is None or not weight.requires_grad or input.dim() != 3:
            return ColumnParallelLinear._forward_impl(self, input, weight, *args, **kwargs)
        after = None
        if self.gns_tied:
            tracker = self.gns_tracker
            idx, valid = tracker.tied_tokens(mb)
            after = lambda x, dy: tracker.set_tied_rows(mb, _tied_rows(x, dy, idx, valid))  # noqa: E731
        return _linear_impl(self, mb, input, weight, *args, after_wgrad=after, **kwargs)


def convert_embedding_layers(gpt_model, pp_size: int) -> List[torch.nn.Parameter]:
    """Swap the word embedding / output layer of an (unwrapped) GPTModel to GNS classes.

    Returns the parameters they add to the tracked set. Raises NotImplementedError for
    tied weights split over pipeline stages.
    """
    tied = bool(getattr(gpt_model, "share_embeddings_and_output_weights", False))
    if tied and pp_size > 1:
        raise NotImplementedError(
            "--gns-include-embedding with tied embedding/output weights and pipeline "
            "parallelism is not supported (the cross term spans two stages): add "
            "--untie-embeddings-and-output-weights or drop --gns-include-embedding")
    params = []
    emb = getattr(getattr(gpt_model, "embedding", None), "word_embeddings", None)
    if emb is not None and getattr(gpt_model, "pre_process", False):
        emb.__class__ = GNSVocabParallelEmbedding
        emb.gns_tied = tied
        params.append(emb.weight)
    if getattr(gpt_model, "position_embedding_type", "rope") == "learned_absolute":
        raise NotImplementedError("--gns-include-embedding does not cover learned absolute "
                                  "position embeddings; use rope or drop the flag")
    out = getattr(gpt_model, "output_layer", None)
    if out is not None and getattr(gpt_model, "post_process", False):
        out.__class__ = GNSOutputLayer
        out.gns_tied = tied
        if out.weight is not None:  # None when tied: the embedding weight is passed in
            params.append(out.weight)
    return params
