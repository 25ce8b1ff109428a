"""Inputs of the memory planner: `ModelShape` (the GPT) and `ParallelLayout` (how it is
split and recomputed). Pure Python, no torch / Megatron import.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_KINDS = ("flash", "local")
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) * tp.
VOCAB_DIVISIBLE_BY = 128


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ModelShape:
    """Shape of a megatron-core GPT (pre-LN, rotary positions, LayerNorm with bias)."""

    num_layers: int
    """Transformer layers (--num-layers)."""
    hidden_size: int
    """Model width h (--hidden-size)."""
    num_attention_heads: int
    """Attention heads a (--num-attention-heads)."""
    seq_length: int
    """Sequence length s in tokens (--seq-length)."""
    vocab_size: int
    """Vocabulary size before Megatron's padding to a multiple of 128 * tp."""
    ffn_hidden_size: Optional[int] = None
    """MLP width f (--ffn-hidden-size); None = 4h like Megatron."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (--num-query-groups); None = a (MHA)."""
    swiglu: bool = False
    """SwiGLU MLP (fc1 is 2f wide) instead of GeLU."""
    untie_embeddings: bool = True
    """Separate output-layer weights (--untie-embeddings-and-output-weights)."""
    dropout: bool = True
    """Hidden/attention dropout on (Megatron default 0.1): adds 1-byte masks and, for local
    attention, the dropped-out copy of the attention probabilities."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "vocab_size"):
            _positive(name, getattr(self, name))
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _positive("ffn_hidden_size", self.ffn_hidden_size)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _positive("num_query_groups", self.num_query_groups)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be "
                             f"divisible by num_query_groups ({self.num_query_groups})")

    @property
    def kv_hidden(self) -> int:
        """Width of K (and of V): h * groups / heads."""
        return self.hidden_size * self.num_query_groups // self.num_attention_heads

    def padded_vocab(self, tp: int = 1) -> int:
        m = VOCAB_DIVISIBLE_BY * tp
        return -(-self.vocab_size // m) * m

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one transformer layer held by one tensor-parallel rank."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.kv_hidden
        fc1 = 2 * f if self.swiglu else f
        # Column-parallel (split over tp): QKV weight+bias, fc1 weight+bias.
        # Row-parallel weights split over tp; their biases are replicated.
        split = (h * (h + 2 * kv) + (h + 2 * kv)) + h * h + (h * fc1 + fc1) + f * h
        replicated = h + h + 2 * (2 * h)  # proj bias, fc2 bias, two LayerNorms (w + b)
        return -(-split // tp) + replicated

    def num_params(self) -> int:
        """Total parameter count (tied embedding counted once, vocab padded for tp=1)."""
        v, h = self.padded_vocab(1), self.hidden_size
        emb = v * h * (2 if self.untie_embeddings else 1)
        return self.num_layers * self.layer_params(1) + emb + 2 * h  # + final LayerNorm

    def with_seq_length(self, seq_length: int) -> "ModelShape":
        return replace(self, seq_length=seq_length)


@dataclass
class ParallelLayout:
    """How the model is split over GPUs and which activations are recomputed."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (1F1B schedule, no virtual stages)."""
    dp: int = 1
    """Data-parallel size (the distributed optimizer shards its state over dp * cp)."""
    cp: int = 1
    """Context-parallel size (splits the sequence; needs flash attention)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards LayerNorm/dropout activations over tp)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    num_microbatches: int = 1
    """Micro-batches per optimizer step per data-parallel rank."""
    recompute_granularity: Optional[str] = None
    """None, "selective" (recompute core attention) or "full" (recompute whole layers)."""
    recompute_method: str = "uniform"
    """Full recompute: "uniform" (checkpoint chunks of N layers) or "block" (checkpoint the
    first N layers of each pipeline stage, keep the others' activations)."""
    recompute_num_layers: int = 1
    """N of --recompute-method."""
    distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam moments over dp (--use-distributed-optimizer)."""
    attention: str = "flash"
    """"flash" (TE/SDPA flash attention, scores never stored) or "local" (megatron-core
    DotProductAttention, materialises the a x s x s scores)."""

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "cp", "micro_batch_size", "num_microbatches"):
            _positive(name, getattr(self, name))
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"recompute_granularity must be one of "
                             f"{RECOMPUTE_GRANULARITIES}, got {self.recompute_granularity!r}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(f"recompute_method must be one of {RECOMPUTE_METHODS}, "
                             f"got {self.recompute_method!r}")
        _positive("recompute_num_layers", self.recompute_num_layers)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, "
                             f"got {self.attention!r}")
        if self.cp > 1 and self.attention == "local":
            raise ValueError("context parallelism needs flash attention; use "
                             "attention='flash' or cp=1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def sp(self) -> bool:
        """Sequence parallelism is only active with tp > 1 (Megatron turns it off at tp=1)."""
        return self.sequence_parallel and self.tp > 1
