"""Tensor conversion between HuggingFace weights and our canonical parameters.

Main API: :func:`to_megatron` (HF tensors -> {canonical name: full tensor}, for
``training.model.load_weights_by_name``) and :func:`to_hf` (the reverse), :class:`Shape` (what
the transforms need to know of the model).

Every transform is a pure re-arrangement (concatenation, interleaving, transposition, padding
rows with zeros and cutting them off again), so import followed by export gives every tensor
back bit for bit (in the HF file's dtype; the checkpoint holds fp32, which holds fp16/bf16
values exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List

import torch

from megatron_ext.hf.mapping import LAYOUTS, Unsupported, hf_names


@dataclass(frozen=True)
class Shape:
    """The model's attention layout and vocabulary (for the qkv and vocab transforms)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """The HF vocabulary (rows kept on export)."""
    padded_vocab_size: int
    """Rows of our embedding and output layer."""


def _group_rows(shape: Shape) -> List[int]:
    """Rows of one query group in our linear_qkv: its query heads, its key, its value."""
    per_group = shape.num_attention_heads // shape.num_query_groups
    return [per_group * shape.head_dim, shape.head_dim, shape.head_dim]


def _interleave(parts: List[torch.Tensor], shape: Shape) -> torch.Tensor:
    rest = parts[0].shape[1:]
    grouped = [p.reshape(shape.num_query_groups, -1, *rest) for p in parts]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def _split(qkv: torch.Tensor, shape: Shape) -> List[torch.Tensor]:
    rest = qkv.shape[1:]
    grouped = qkv.reshape(shape.num_query_groups, -1, *rest).split(_group_rows(shape), dim=1)
    return [g.reshape(-1, *rest) for g in grouped]


def _forward(transform, parts: List[torch.Tensor], shape: Shape) -> torch.Tensor:
    if transform is None:
        return parts[0]
    if transform == "cat":
        return torch.cat(parts, dim=0)
    if transform == "qkv":
        return _interleave(parts, shape)
    if transform == "fused_qkv":  # GPT-2's c_attn: Conv1D [in, 3 out] or bias [3 out]
        rows = parts[0].t() if parts[0].dim() == 2 else parts[0]
        return _interleave(list(rows.chunk(3, dim=0)), shape)
    if transform == "t":
        return parts[0].t()
    if transform == "vocab":
        rows = parts[0]
        pad = rows.new_zeros(shape.padded_vocab_size - rows.shape[0], *rows.shape[1:])
        return torch.cat([rows, pad])
    raise ValueError(f"unknown transform {transform}")


def _backward(transform, ours: torch.Tensor, shape: Shape) -> List[torch.Tensor]:
    if transform is None:
        return [ours]
    if transform == "cat":
        return list(ours.chunk(2, dim=0))
    if transform == "qkv":
        return _split(ours, shape)
    if transform == "fused_qkv":
        rows = torch.cat(_split(ours, shape), dim=0)
        return [rows.t() if rows.dim() == 2 else rows]
    if transform == "t":
        return [ours.t()]
    if transform == "vocab":
        return [ours[:shape.vocab_size]]
    raise ValueError(f"unknown transform {transform}")


def to_megatron(arch: str, names: Iterable[str], get: Callable[[str], torch.Tensor],
                shape: Shape) -> Dict[str, torch.Tensor]:
    """Full tensors for our canonical parameter ``names`` from HF tensors (``get(name)``)."""
    return {ours: _forward(transform, [get(n) for n in hf], shape)
            for ours in names for hf, transform in [hf_names(arch, ours)]}


def to_hf(arch: str, ours: Dict[str, torch.Tensor], shape: Shape,
          dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """HF tensors (contiguous, ``dtype``) from our full tensors by canonical name."""
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        hf, transform = hf_names(arch, name)
        for hf_name, part in zip(hf, _backward(transform, tensor, shape)):
            out[hf_name] = part.to(dtype).contiguous()
    return out


def ignored(arch: str, name: str) -> bool:
    """HF buffers that are not weights (causal-mask and rotary buffers of older files)."""
    return name.endswith(LAYOUTS[arch][3])


__all__ = ["Shape", "to_megatron", "to_hf", "ignored", "Unsupported"]
