"""Inputs of the memory planner: `ModelShape` (the GPT, from `megatron_ext.cost_model`,
re-exported here) and `ParallelLayout` (how it is split and recomputed). Pure Python, no
torch / Megatron import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..cost_model import ModelShape, require_choice, require_positive

__all__ = ["ModelShape", "ParallelLayout"]

RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_KINDS = ("flash", "local")


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
            require_positive(name, getattr(self, name))
        require_choice("recompute_granularity", self.recompute_granularity,
                       RECOMPUTE_GRANULARITIES)
        require_choice("recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        require_positive("recompute_num_layers", self.recompute_num_layers)
        require_choice("attention", self.attention, ATTENTION_KINDS)
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
