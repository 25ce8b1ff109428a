"""Cost model of a megatron-core GPT: exact parameter count and model FLOPs (pure Python).

Main API: `ModelShape` (the GPT's shape; `num_params()`, `layer_params(tp)`,
`padded_vocab(tp)`, `forward_flops_per_token(tp)`, `flops_per_sample(tp)`,
`ModelShape.from_megatron_args(args, vocab_size)`) and `add_model_shape_args(parser)`
(Megatron-LM's model flags, for command lines that build a `ModelShape`).

One model, three users: the memory planner (weights, activations), the batch-growth planner
(step time from FLOPs and gradient bytes) and the training log (MFU). No torch, no Megatron:
`num_params()` is checked against `sum(p.numel())` of real megatron-core GPTModels in
tests/test_cost_model.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Dict, Optional

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")


def require_positive(name: str, value) -> None:
    """ValueError unless `value` is an int >= 1 (the message names the field)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_choice(name: str, value, choices) -> None:
    """ValueError unless `value` is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass
class ModelShape:
    """Shape of a megatron-core GPTModel built with megatron_ext's layer spec (pre-norm
    TransformerLayer: norm, SelfAttention, norm, MLP; a final norm; vocab-parallel embedding
    and output layer; no MoE, no multi-token prediction)."""

    num_layers: int
    """Transformer layers L (--num-layers)."""
    hidden_size: int
    """Model width h (--hidden-size)."""
    num_attention_heads: int
    """Query heads a (--num-attention-heads)."""
    seq_length: int
    """Sequence length s in tokens (--seq-length)."""
    vocab_size: int
    """Tokenizer vocabulary before Megatron's padding (see `padded_vocab`)."""
    ffn_hidden_size: Optional[int] = None
    """MLP width f (--ffn-hidden-size); None = 4h like Megatron."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (--num-query-groups); None = a (MHA)."""
    swiglu: bool = False
    """SwiGLU MLP (--swiglu): fc1 is 2f wide (gate and value), fc2 f -> h."""
    untie_embeddings: bool = True
    """Separate output-layer weights (--untie-embeddings-and-output-weights); False = the
    output layer reuses the word embedding (one table counted once)."""
    dropout: bool = True
    """Hidden/attention dropout on (Megatron default 0.1): only the memory planner uses it
    (1-byte masks and, for local attention, the dropped-out attention probabilities)."""
    kv_channels: Optional[int] = None
    """Head dimension d (--kv-channels); None = h / a."""
    add_bias_linear: bool = True
    """Biases in QKV, projection, fc1 and fc2 (False = --disable-bias-linear)."""
    normalization: str = "LayerNorm"
    """"LayerNorm" (weight and bias) or "RMSNorm" (weight only) (--normalization)."""
    position_embedding_type: str = "rope"
    """"rope" (no parameters) or "learned_absolute" (a max_position_embeddings x h table on
    the first pipeline stage) (--position-embedding-type)."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (--max-position-embeddings); None = seq_length
    (follows `with_seq_length`). Unused with rope."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this x tp
    (--make-vocab-size-divisible-by)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head (--qk-layernorm): two norms of width d per layer."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "vocab_size", "make_vocab_size_divisible_by"):
            require_positive(name, getattr(self, name))
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}), or give "
                                 "kv_channels (--kv-channels) explicitly")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            require_positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be "
                             f"divisible by num_query_groups ({self.num_query_groups})")
        self._check_choices()

    def _check_choices(self) -> None:
        require_choice("normalization", self.normalization, NORMALIZATIONS)
        require_choice("position_embedding_type", self.position_embedding_type,
                       POSITION_EMBEDDINGS)
        if self.max_position_embeddings is not None:
            require_positive("max_position_embeddings", self.max_position_embeddings)
            if self.learned_positions and self.max_position_embeddings < self.seq_length:
                raise ValueError(
                    f"seq_length ({self.seq_length}) exceeds the learned position table "
                    f"(max_position_embeddings={self.max_position_embeddings}): raise "
                    "--max-position-embeddings or shorten the sequence")

    # ------------------------------------------------------------------ widths
    @property
    def q_hidden(self) -> int:
        """Width of Q, of the attention output and of the projection input: a * d."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_hidden(self) -> int:
        """Width of K (and of V): groups * d."""
        return self.num_query_groups * self.kv_channels

    @property
    def fc1_width(self) -> int:
        """Output width of fc1: 2f with SwiGLU (gate and value halves), else f."""
        return 2 * self.ffn_hidden_size if self.swiglu else self.ffn_hidden_size

    @property
    def learned_positions(self) -> bool:
        return self.position_embedding_type == "learned_absolute"

    def norm_params(self, width: int) -> int:
        """Parameters of one norm over `width` features (LayerNorm has a bias)."""
        return width * (2 if self.normalization == "LayerNorm" else 1)

    def padded_vocab(self, tp: int = 1) -> int:
        """Vocabulary rows Megatron allocates: a multiple of make_vocab_size_divisible_by * tp
        (so every tensor-parallel shard of the embedding has the same size)."""
        m = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // m) * m

    # ------------------------------------------------------------------ parameters
    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one transformer layer held by one tensor-parallel rank.

        Column-parallel QKV (h -> q + 2kv) and fc1 (h -> fc1) split weights and biases over
        tp; row-parallel projection (q -> h) and fc2 (f -> h) split their weights, their
        biases are replicated, as are the two norms and the q/k norms (width d).
        """
        h, f, q, kv = self.hidden_size, self.ffn_hidden_size, self.q_hidden, self.kv_hidden
        bias = 1 if self.add_bias_linear else 0
        split = (h + bias) * (q + 2 * kv) + q * h + (h + bias) * self.fc1_width + f * h
        replicated = 2 * bias * h + 2 * self.norm_params(h)
        if self.qk_layernorm:
            replicated += 2 * self.norm_params(self.kv_channels)
        return -(-split // tp) + replicated

    def word_embedding_params(self, tp: int = 1) -> int:
        """One tensor-parallel shard of the (vocab-parallel) word embedding or output layer."""
        return self.padded_vocab(tp) * self.hidden_size // tp

    def position_embedding_params(self) -> int:
        """Learned position table (replicated over tp, first stage only); 0 with rope."""
        if not self.learned_positions:
            return 0
        return (self.max_position_embeddings or self.seq_length) * self.hidden_size

    def final_norm_params(self) -> int:
        return self.norm_params(self.hidden_size)

    def num_params(self, tp: int = 1) -> int:
        """Parameters of the whole model, unsharded, with the vocab padded for `tp` (a tied
        output layer is counted once: megatron-core allocates no weight for it at pp=1)."""
        tables = 2 if self.untie_embeddings else 1
        return (self.num_layers * self.layer_params(1)
                + tables * self.word_embedding_params(tp) * tp
                + self.position_embedding_params() + self.final_norm_params())

    # ------------------------------------------------------------------ FLOPs
    def forward_flops_per_token(self, tp: int = 1) -> Dict[str, int]:
        """Forward model FLOPs of one token, by part (2 FLOPs per multiply-add).

        layers:    L * 2 * [h(q + 2kv) + q h + h fc1 + f h]   (QKV, projection, MLP)
        attention: L * 2 * q * s   (QK^T and PV are 2 * 2 * s * q; the causal mask halves
                   them, as Megatron-LM counts; biases, norms, softmax are not counted)
        logits:    2 * h * V_padded(tp)
        """
        h, f, q, kv = self.hidden_size, self.ffn_hidden_size, self.q_hidden, self.kv_hidden
        dense = 2 * (h * (q + 2 * kv) + q * h + h * self.fc1_width + f * h)
        return {"layers": self.num_layers * dense,
                "attention": self.num_layers * 2 * q * self.seq_length,
                "logits": 2 * h * self.padded_vocab(tp)}

    def flops_per_sample(self, tp: int = 1) -> int:
        """Model FLOPs of forward + backward of one sequence of `seq_length` tokens.

        Backward = 2 x forward (gradients of inputs and of weights), so per token
            6 * L * [h(q + 2kv) + q h + q s + h f (3 if SwiGLU else 2)] + 6 h V_padded
        with q = a d, kv = groups d: Megatron-LM's `num_floating_point_operations` for a
        dense GPT with causal attention (Narayanan et al. 2021, "Efficient Large-Scale
        Language Model Training on GPU Clusters", eq. 3, without its recomputation term).
        For MHA, d = h/a, f = 4h, GeLU this is 72 s L h^2 (1 + s/(12h) + V/(12 L h)).
        Recomputation is not counted: these are the model FLOPs of MFU.
        """
        return 3 * self.seq_length * sum(self.forward_flops_per_token(tp).values())

    # ------------------------------------------------------------------ construction
    def with_seq_length(self, seq_length: int) -> "ModelShape":
        return replace(self, seq_length=seq_length)

    @classmethod
    def from_megatron_args(cls, args, vocab_size: Optional[int] = None) -> "ModelShape":
        """The GPT that a Megatron-LM-style configuration builds.

        `args`: anything with Megatron-LM flag names as attributes (an argparse Namespace,
        megatron_ext's training ModelConfig); missing ones take megatron_ext's defaults.
        `vocab_size`: the tokenizer's (unpadded) vocabulary, default `args.vocab_size`.
        """
        def get(name, default=None):
            return getattr(args, name, default)

        dropout = get("hidden_dropout", 0.1) > 0 or get("attention_dropout", 0.1) > 0
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
            vocab_size=args.vocab_size if vocab_size is None else vocab_size,
            ffn_hidden_size=get("ffn_hidden_size"), num_query_groups=get("num_query_groups"),
            swiglu=bool(get("swiglu", False)),
            untie_embeddings=bool(get("untie_embeddings_and_output_weights", False)),
            dropout=dropout and not get("no_dropout", False),
            kv_channels=get("kv_channels"), add_bias_linear=not get("disable_bias_linear", False),
            normalization=get("normalization", "LayerNorm"),
            position_embedding_type=get("position_embedding_type", "rope"),
            max_position_embeddings=get("max_position_embeddings"),
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128),
            qk_layernorm=bool(get("qk_layernorm", False)))


def add_model_shape_args(parser: argparse.ArgumentParser,
                         required: bool = True) -> argparse._ArgumentGroup:
    """Megatron-LM's model-shape flags (what `ModelShape.from_megatron_args` reads).

    `required=False` lets a caller fill num-layers/hidden-size/heads/seq-length itself
    (e.g. from a preset); `parser.set_defaults(...)` changes a default."""
    g = parser.add_argument_group("model (Megatron flag names)")
    for name, text in (("--num-layers", "transformer layers"), ("--hidden-size", "width h"),
                       ("--num-attention-heads", "query heads"),
                       ("--seq-length", "tokens per sample")):
        g.add_argument(name, type=int, required=required, default=None, help=text)
    g.add_argument("--vocab-size", type=int, default=50304, help="before padding")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA; default heads")
    g.add_argument("--kv-channels", type=int, default=None, help="default hidden / heads")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--normalization", choices=NORMALIZATIONS, default="LayerNorm")
    g.add_argument("--position-embedding-type", choices=POSITION_EMBEDDINGS, default="rope")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="learned position table rows; default seq-length")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    return g
