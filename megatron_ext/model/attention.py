"""Flash / SDPA core attention for megatron-core layer specs, with context parallelism.

Main API: :func:`get_core_attention` (``AttentionConfig`` -> class for the ``core_attention``
slot of ``SelfAttentionSubmodules`` + a description of the path that will run) and
:class:`FlashCoreAttention` (same constructor and forward as megatron-core's
``DotProductAttention``).

Why: megatron-core's ``DotProductAttention`` materialises the ``[b, np, s, s]`` score tensor
(O(s^2) memory) and refuses context parallelism; without Transformer Engine the only fused
attention is flash-attn (Dao et al., https://arxiv.org/abs/2205.14135) or PyTorch's
``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels, ordered by
:func:`set_sdpa_priority`). Both compute the softmax in fp32 on-chip, never store the scores,
and support GQA without repeating K/V.

Semantics (match ``DotProductAttention``): inputs ``[s, b, np, hn]`` for queries and
``[s, b, ng, hn]`` for keys/values (this TP rank's heads; query head ``i`` uses K/V group
``i // (np / ng)``), output ``[s, b, np * hn]``; softmax scale ``1 / sqrt(hn)`` unless given;
dropout on the attention probabilities, under the tensor-parallel RNG tracker unless sequence
parallelism is on (then ``TransformerBlock`` already forks it). Like TE, the
``attention_mask`` argument is ignored: the mask type (``causal`` or ``no_mask``) decides.
With a context-parallel group of size > 1 the module runs ring attention
(:mod:`megatron_ext.model.ring_attention`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_ext.model.attention_config import AttentionConfig
from megatron_ext.model.ring_attention import context_parallel_group_size, ring_attention

logger = logging.getLogger(__name__)

_warned: set = set()
_SDPA_PLANS: dict = {}  # (dtype, head_dim, gqa, dropout) -> first SDPA plan that ran
_SDPA_FUSED = ("flash", "cudnn", "efficient")  # fused SDPA kernels allowed (names below)
_SDPA_ORDER: tuple = ()  # their priority when set; () keeps PyTorch's own order


def set_sdpa_priority(names) -> None:
    """Order in which SDPA tries its fused kernels: names from "cudnn", "flash",
    "efficient" (e.g. ``("cudnn", "flash", "efficient")``); empty restores PyTorch's own
    order. cuDNN attention is allowed either way (the benchmarks compare the orders)."""
    names = tuple(n for n in names if n)
    bad = [n for n in names if n not in _SDPA_FUSED]
    if bad:
        raise ValueError(f"SDPA backends {bad}: choose from {', '.join(_SDPA_FUSED)}")
    global _SDPA_ORDER
    _SDPA_ORDER = names
    _SDPA_PLANS.clear()


def _sdpa_fused_backends() -> list:
    from torch.nn.attention import SDPBackend

    by_name = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}  # torch >= 2.2
    names = _SDPA_ORDER + tuple(n for n in _SDPA_FUSED if n not in _SDPA_ORDER)
    return [by_name[n] for n in names if by_name[n] is not None]


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def flash_attn_available() -> bool:
    """True if the ``flash_attn`` package can be imported (it needs CUDA to run)."""
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_version() -> str:
    try:
        import flash_attn

        return flash_attn.__version__
    except Exception:  # pragma: no cover - only reached with a broken install
        return "?"


class FlashCoreAttention(MegatronModule):
    """Core attention via flash-attn (``backend="flash"``) or PyTorch SDPA (``"sdpa"``).

    Constructor = ``DotProductAttention``'s plus ``backend``; the subclasses
    :class:`SDPACoreAttention` / :class:`FlashAttnCoreAttention` fix it, because
    ``SelfAttention`` calls the ``core_attention`` slot directly (a ``ModuleSpec`` there would
    not be built).
    """

    backend: str = "sdpa"

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.backend = backend or type(self).backend
        if self.backend not in ("flash", "sdpa"):
            raise ValueError(f"FlashCoreAttention backend {self.backend!r}: use 'flash' or 'sdpa'")
        if self.backend == "flash" and not flash_attn_available():
            raise ValueError("backend 'flash' needs `pip install flash-attn`; or use 'sdpa'")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"softmax_type={config.softmax_type!r} needs megatron's local attention "
                "(--attention-backend local)"
            )
        window = is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        )
        if window:
            raise ValueError("sliding-window attention: use --attention-backend local")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(
                f"attn_mask_type {attn_mask_type.name}: FlashCoreAttention supports causal and "
                "no_mask; use --attention-backend local for explicit masks"
            )
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(f"cp_comm_type={cp_comm_type!r}: only 'p2p' (ring) is implemented")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        # DotProductAttention divides the scale by layer_number under
        # apply_query_key_layer_scaling and multiplies the scores back in fp32 (an fp16 overflow
        # guard for the materialised QK^T); flash/SDPA accumulate in fp32, so the plain scale is
        # the mathematically identical choice.
        hn = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(hn) if softmax_scale is None else softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    # ------------------------------------------------------------------------------ kernels
    def _sdpa(self, q, k, v, causal: bool, dropout_p: float):
        """q ``[b, np, sq, hn]``, k/v ``[b, ng, sk, hn]`` -> ``[b, np, sq, hn]``."""
        gqa = q.size(1) != k.size(1)
        kwargs = dict(dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale)
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fused = _sdpa_fused_backends()
        # Try, in order: fused kernels with native GQA; fused kernels on repeated K/V (the
        # efficient kernel takes fp32 but not enable_gqa); the math kernel. The first plan that
        # works for this (dtype, head_dim, gqa) is remembered, so failures are paid once.
        key = (q.dtype, q.size(-1), gqa, dropout_p > 0)
        plans = ("native", "repeat", "math") if gqa else ("native", "math")
        if key in _SDPA_PLANS:
            plans = (_SDPA_PLANS[key],)
        for plan in plans:
            if plan == "repeat":
                r = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
                gqa = False
            if plan == "math":
                _warn_once(
                    "sdpa-math",
                    f"SDPA: no flash/efficient kernel for dtype={q.dtype}, head_dim={q.size(-1)}; "
                    "falling back to the math kernel (materialises the s x s scores)",
                )
            backends = [SDPBackend.MATH] if plan == "math" else fused
            try:
                # set_priority only when an order was asked for: older torch lacks the keyword
                priority = {"set_priority": True} if _SDPA_ORDER and plan != "math" else {}
                with sdpa_kernel(backends, **priority):
                    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
            except RuntimeError:
                if plan == plans[-1]:
                    raise
                continue
            _SDPA_PLANS[key] = plan
            return out

    def _flash(self, query, key, value, causal: bool, dropout_p: float):
        """flash-attn on ``[b, s, h, d]`` views; returns ``[sq, b, np, hn]``."""
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            dropout_p=dropout_p,
            softmax_scale=self.softmax_scale,
            causal=causal,
        )  # [b, sq, np, hn]
        return out.transpose(0, 1)

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (THD): not supported by FlashCoreAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by FlashCoreAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        sk = key.size(0)
        causal = mask_type == AttnMaskType.causal and sq > 1  # one query row: nothing to mask
        if causal and sq != sk:
            raise NotImplementedError(
                f"causal attention with sq={sq} != sk={sk} (KV-cache prefill): "
                "use the local backend"
            )
        dropout_p = self.dropout_p if self.training else 0.0

        if context_parallel_group_size(self.cp_group) > 1:
            if dropout_p > 0:
                raise ValueError(
                    "attention dropout with context parallelism: set attention_dropout=0"
                )
            return ring_attention(
                query, key, value, self.softmax_scale, self.cp_group, causal=causal,
                use_flash=self.backend == "flash",
            )

        # Without SP, heads differ per TP rank -> draw dropout from the per-rank TP RNG stream;
        # with SP, TransformerBlock already runs the whole layer under the tracker's fork.
        if dropout_p > 0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = contextlib.nullcontext()
        use_flash = self.backend == "flash" and query.is_cuda
        if use_flash and query.dtype not in (torch.float16, torch.bfloat16):
            _warn_once("flash-fp32", f"flash-attn needs fp16/bf16, got {query.dtype}: using SDPA")
            use_flash = False
        with rng:
            if use_flash:
                out = self._flash(query, key, value, causal, dropout_p)  # [sq, b, np, hn]
            else:
                out = self._sdpa(
                    query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
                    key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]
                    value.permute(1, 2, 0, 3),
                    causal,
                    dropout_p,
                ).permute(2, 0, 1, 3)  # [sq, b, np, hn]
        return out.reshape(sq, b, np_ * hn)


class SDPACoreAttention(FlashCoreAttention):
    """:class:`FlashCoreAttention` on ``torch.nn.functional.scaled_dot_product_attention``."""

    backend = "sdpa"


class FlashAttnCoreAttention(FlashCoreAttention):
    """:class:`FlashCoreAttention` on ``flash_attn.flash_attn_func``."""

    backend = "flash"


def resolve_attention_backend(name: str) -> str:
    """``auto`` -> ``flash`` when flash-attn is importable and CUDA is present, else ``sdpa``."""
    if name == "auto":
        return "flash" if flash_attn_available() and torch.cuda.is_available() else "sdpa"
    return name


def get_core_attention(config: AttentionConfig) -> tuple[type, str]:
    """The ``core_attention`` class for ``get_gpt_layer_spec`` and what will run, in words."""
    backend = resolve_attention_backend(config.attention_backend)
    cp = config.context_parallel_size
    blocks = (
        "block forward flash-attn, block backward fp32 PyTorch" if backend == "flash"
        else "blockwise fp32 PyTorch attention"
    )
    ring = f" + ring attention over CP={cp} (load-balanced causal split; {blocks})"
    ring = ring if cp > 1 else ""
    if backend == "local":
        return DotProductAttention, "local (megatron-core DotProductAttention, s x s scores)"
    if backend == "flash":
        if not flash_attn_available():
            raise ValueError("--attention-backend flash needs `pip install flash-attn` (or: sdpa)")
        return FlashAttnCoreAttention, f"flash-attn {_flash_attn_version()} flash_attn_func{ring}"
    if torch.cuda.is_available():
        kernels = "flash/efficient kernels, math fallback with a warning"
    else:
        kernels = "CPU kernel"
    return SDPACoreAttention, (
        f"sdpa (torch {torch.__version__} scaled_dot_product_attention, {kernels}){ring}"
    )
