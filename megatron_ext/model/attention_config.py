"""Configuration of the core-attention backend and context parallelism.

Main API: :class:`AttentionConfig`, :func:`add_attention_args`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_ext.config_flags import FlagConfig

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "local")


@dataclass
class AttentionConfig(FlagConfig):
    """Core attention and context parallelism."""

    flag_group = "attention and context parallelism"

    attention_backend: str = field(default="auto",
                                   metadata={"argparse": {"choices": ATTENTION_BACKENDS}})
    """Core attention: ``flash`` (flash-attn package), ``sdpa`` (PyTorch
    scaled_dot_product_attention, flash/efficient kernels), ``local`` (megatron-core's
    DotProductAttention, materialises s x s scores) or ``auto`` (flash if importable, else sdpa)."""

    context_parallel_size: int = 1
    """Split every sequence over this many ranks (ring attention with the load-balanced causal
    split). Needs the flash/sdpa backend: megatron-core's local attention refuses CP."""

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend {self.attention_backend!r}: choose one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.context_parallel_size < 1:
            raise ValueError("--context-parallel-size must be >= 1")
        if self.context_parallel_size > 1 and self.attention_backend == "local":
            raise ValueError(
                "--context-parallel-size > 1 needs --attention-backend auto, flash or sdpa "
                "(megatron-core's local attention does not support context parallelism)"
            )


def add_attention_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "attention and context parallelism" argparse group; flags map 1:1 to :class:`AttentionConfig` fields."""
    return AttentionConfig.add_args(parser)
