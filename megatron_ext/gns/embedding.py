"""Per-sample gradient norms of the word embedding and the output layer (--gns-include-embedding).

Main API:
    GNSGPTModel(*gpt_model_args, gns_recorder=None, **gpt_model_kwargs)
        megatron-core's GPTModel whose word embedding / output layer report to the recorder
    GNSLanguageModelEmbedding, GNSVocabParallelEmbedding, GNSOutputLayer   (built by it)

`GPTModel` builds its word embedding (inside `LanguageModelEmbedding`) and output layer
itself, not through the layer spec, so `GNSGPTModel.__init__` builds GNS versions of the two
with the same arguments, hands them the parameter objects GPTModel created (so the model,
its parameter flags and tied weights are exactly GPTModel's) and leaves the RNG as it found
it. Without a recorder it is GPTModel.

Embedding: dE_i has one row per distinct token of sample i, the sum of the output grads of
that token's positions; rows of the local vocab shard are summed per (sample, token) with a
sort + scatter (memory O(b·s·h), exact, no host sync) and squared. Vocab shards are disjoint: additive over TP.

Tied embedding/output weight (Megatron's default, PP = 1): the per-sample gradient is
E_i + O_i (embedding part + output-layer part), so ‖g_i‖² = ‖E_i‖² + ‖O_i‖² + 2⟨E_i, O_i⟩.
The output layer's kernel gives ‖O_i‖²; for the cross term only the rows of O_i at the
sample's own tokens matter: O_i[tok_t] = Σ_t' dy[t', i, tok_t] x[t', i] (an [s, s] x [s, h]
GEMM per sample in the output layer's backward), and ⟨E_i, O_i⟩ = Σ_t ⟨dx[i, t], O_i[tok_t]⟩
in the embedding's backward, which runs later in the same micro-batch. With pipeline
parallelism the two halves live on different stages: not supported (ValueError).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from .config import include_embedding_problem
from .layers import GNSColumnParallelLinear, gns_linear, measured_microbatch


def _per_sample_row_sq_norms(idx, flat_dy, b: int, num_rows: int) -> torch.Tensor:
    """Σ_rows ‖dE_i[row]‖² per sample: row sums per (sample, token id), squared, summed.

    idx: [b, s] local token ids, flat_dy: [b*s, h] fp32 (zero at other shards' tokens, so
    their placeholder id 0 adds nothing). Distinct (sample, token) keys are found by a sort
    and a cumulative sum over "key changed" flags, into at most b*s fixed slots: no
    data-dependent sizes (torch.unique, boolean masks), hence no host sync per micro-batch.
    """
    n = idx.numel()
    keys = (torch.arange(b, device=idx.device).unsqueeze(1) * num_rows + idx).reshape(-1)
    keys, order = torch.sort(keys)
    new = torch.ones_like(keys, dtype=torch.long)
    new[1:] = keys[1:] != keys[:-1]
    slot = new.cumsum(0) - 1  # [b*s] slot of each sorted token, < n
    rows = torch.zeros(n, flat_dy.shape[1], dtype=torch.float32, device=flat_dy.device)
    rows.index_add_(0, slot, flat_dy.index_select(0, order))
    sample = torch.zeros(n, dtype=torch.long, device=idx.device)
    sample.scatter_(0, slot, keys // num_rows)  # unused slots: sample 0, row 0 (adds 0)
    sq = torch.zeros(b, dtype=torch.float64, device=flat_dy.device)
    return sq.index_add_(0, sample, rows.square().sum(-1).double())


class _EmbeddingWithSampleNorms(torch.autograd.Function):
    """F.embedding on the local vocab shard; backward reports per-sample ‖dE_i‖² (+ cross)."""

    @staticmethod
    def forward(ctx, idx, weight, valid, recorder, mb, tied):  # idx, valid: [b, s]
        ctx.save_for_backward(idx, valid)
        ctx.recorder, ctx.mb, ctx.tied = recorder, mb, tied
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
        sq = _per_sample_row_sq_norms(idx, flat_dy, b, ctx.num_rows)  # [b] fp64
        if ctx.tied:  # 2 <E_i, O_i> with the output layer's rows at this sample's tokens
            out_rows = ctx.recorder.pop_tied_rows(ctx.mb)  # [b, s, h] fp32
            sq += 2.0 * (dyf * out_rows).sum((1, 2)).double()
        ctx.recorder.add_sq_norms(ctx.mb, sq)
        return None, grad_w.to(ctx.w_dtype), None, None, None, None


class GNSVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding that reports per-sample squared grad norms to its recorder."""

    def __init__(self, *args, recorder=None, tied: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gns_recorder, self.gns_tied = recorder, tied

    def forward(self, input_):  # input_: [b, s] token ids
        recorder = self.gns_recorder
        mb = (recorder.microbatch_index(self)
              if recorder is not None and self.weight.requires_grad else None)
        if mb is None:
            return super().forward(input_)
        valid, idx = None, input_
        if self.tp_group.size() > 1:
            valid = (input_ >= self.vocab_start_index) & (input_ < self.vocab_end_index)
            idx = (input_ - self.vocab_start_index).masked_fill(~valid, 0)
        if self.gns_tied:
            recorder.set_tied_tokens(mb, idx, valid)
        out = _EmbeddingWithSampleNorms.apply(idx, self.weight, valid, recorder, mb,
                                              self.gns_tied)  # [b, s, h]
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


@contextlib.contextmanager
def _rng_untouched():
    """Building throw-away weights must not shift the random streams training draws from."""
    tracker = get_cuda_rng_tracker()  # Megatron's model-parallel / expert RNG states
    states = {k: v.clone() if torch.is_tensor(v) else v for k, v in tracker.get_states().items()}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        yield
    if states:
        tracker.set_states(states)


def _rebuilt(old: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` (RNG untouched) holding `old`'s parameter objects, flags and all."""
    with _rng_untouched():
        new = build()
    for name, p in old.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(new.get_submodule(owner), attr, p)
    return new


class GNSLanguageModelEmbedding(LanguageModelEmbedding):
    """LanguageModelEmbedding whose word embedding is a `GNSVocabParallelEmbedding`."""

    def __init__(self, *args, recorder=None, tied: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.word_embeddings = _rebuilt(self.word_embeddings, lambda: GNSVocabParallelEmbedding(
            num_embeddings=self.vocab_size, embedding_dim=self.config.hidden_size,
            init_method=self.config.embedding_init_method,
            reduce_scatter_embeddings=self.reduce_scatter_embeddings, config=self.config,
            tp_group=self.tp_group, recorder=recorder, tied=tied))


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

    def __init__(self, *args, tied: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gns_tied = tied

    def _forward_impl(self, input, weight, *args, **kwargs):
        mb = measured_microbatch(self, input, weight)
        if mb is None:
            return ColumnParallelLinear._forward_impl(self, input, weight, *args, **kwargs)
        after = self._cross_term_rows(mb) if self.gns_tied else None
        return gns_linear(self, mb, input, weight, *args, after_wgrad=after, **kwargs)

    def _cross_term_rows(self, mb: int):
        """after_wgrad callback: O_i's rows at the sample's tokens, for the embedding's backward."""
        recorder = self.gns_recorder
        idx, valid = recorder.tied_tokens(mb)  # recorded by the embedding's forward

        def after(x, dy):  # x: [s, b, h] gathered input, dy: [s, b, V/t]
            recorder.set_tied_rows(mb, _tied_rows(x, dy, idx, valid))
        return after


def _check_supported(a: dict) -> None:
    """ValueError for GPT layouts whose embedding/output norms are not measured exactly."""
    config = a["config"]
    problem = include_embedding_problem(a["share_embeddings_and_output_weights"],
                                        config.pipeline_model_parallel_size,
                                        a["position_embedding_type"])
    if problem:
        raise ValueError(problem)
    if a["mtp_block_spec"] is not None or config.defer_embedding_wgrad_compute:
        raise ValueError("--gns-include-embedding supports neither multi-token prediction "
                         "nor defer_embedding_wgrad_compute")


class GNSGPTModel(GPTModel):
    """GPTModel whose word embedding and output layer report per-sample norms.

    Takes GPTModel's arguments plus `gns_recorder` (the `GNSTracker`); None builds a plain
    GPTModel. Raises ValueError for layouts it cannot measure (see `_check_supported`).
    """

    def __init__(self, *args, gns_recorder=None, **kwargs):
        bound = inspect.signature(GPTModel.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if gns_recorder is not None:
            _check_supported(a)
        super().__init__(*args, **kwargs)
        if gns_recorder is None:
            return
        tied = self.share_embeddings_and_output_weights
        if self.pre_process:
            self.embedding = _rebuilt(self.embedding, lambda: GNSLanguageModelEmbedding(
                config=self.config, vocab_size=self.vocab_size,
                max_sequence_length=self.max_sequence_length,
                position_embedding_type=a["position_embedding_type"],
                scatter_to_sequence_parallel=a["scatter_embedding_sequence_parallel"],
                tp_group=self.pg_collection.tp, recorder=gns_recorder, tied=tied))
        if self.post_process:
            self.output_layer = _rebuilt(self.output_layer, lambda: GNSOutputLayer(
                self.config.hidden_size, self.vocab_size, config=self.config,
                init_method=self.config.init_method, bias=False, skip_bias_add=False,
                gather_output=not self.parallel_output,
                skip_weight_param_allocation=self.pre_process and tied,
                embedding_activation_buffer=self.embedding_activation_buffer,
                grad_output_buffer=self.grad_output_buffer, tp_group=self.pg_collection.tp,
                recorder=gns_recorder, tied=tied))
