"""Peak GPU memory of one training step of a megatron-core GPT.

Main API: `estimate_memory(model, layout, dtype_bytes=2) -> MemoryEstimate`.

Activation terms follow Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (Sec. 4, Table 2): per layer and micro-batch, without recompute,
s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations, of which 10*s*b*h (LayerNorm inputs,
QKV/fc1 inputs, dropout masks) are replicated over tensor-parallel ranks unless sequence
parallelism shards them. We generalise the 34 to GQA and any MLP width / SwiGLU and adapt the
5*a*s/h score term to megatron-core's local attention (see `_scores_bytes`).

Peak = max over pipeline stages of
    base + max(base * (fragmentation - 1), block slack) + overhead,
    base = weights + grads + optimizer + activations + logits
where `activations` is the peak of the layers' backward (stored activations of all in-flight
micro-batches + the one layer being recomputed / its attention workspace) and `logits` is
what the loss-time [s, b, V] buffers add on top: they are freed before the layers'
backward starts, so they overlap the stored activations but not the layer workspace.
`block slack` is one largest transient allocation (see `largest_transient_bytes`): PyTorch's
caching allocator cannot merge cached segments, so when single tensors are a sizeable part of
the GPU (fp32 attention scores at long sequence lengths) a free block of that size may be
stranded. It is left out when `PYTORCH_CUDA_ALLOC_CONF` has `expandable_segments:True`, and
by comparisons against `torch.cuda.max_memory_allocated` (which does not see fragmentation).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from ..cost_model import ModelShape
from .shapes import ParallelLayout

GIB = 1 << 30
DEFAULT_OVERHEAD_BYTES = 1 * GIB
DEFAULT_FRAGMENTATION = 1.05


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one GPU (bytes), for the pipeline stage that peaks."""

    weights: int
    """Model weights (dtype_bytes per parameter)."""
    grads: int
    """Megatron DDP main_grad buffer (fp32 with bf16 training)."""
    optimizer: int
    """fp32 master weights + Adam m, v (sharded by the distributed optimizer)."""
    activations: int
    """Peak of the layers' activations (stored + one layer's recompute/attention workspace)."""
    logits: int
    """What the loss-time logits buffers add on top of `activations` (see module doc)."""
    overhead: int
    """CUDA context and library workspaces."""
    fragmentation: int
    """Extra bytes from the allocator fragmentation factor plus the block slack."""
    total: int
    stage: int = 0
    """Pipeline stage with the largest total."""
    params_per_gpu: int = 0
    details: Dict[str, int] = field(default_factory=dict)
    """Activation breakdown: stored (all in-flight micro-batches), transient (recompute /
    attention workspace of one layer), embedding/head extras."""

    def fits(self, gpu_memory_bytes: float) -> bool:
        return self.total <= gpu_memory_bytes

    def as_table(self) -> str:
        rows = [("weights", self.weights), ("grads", self.grads),
                ("optimizer", self.optimizer), ("activations", self.activations),
                ("logits", self.logits), ("fragmentation", self.fragmentation),
                ("overhead", self.overhead)]
        lines = [f"  {name:<14}{v / GIB:9.2f} GiB" for name, v in rows]
        lines.append(f"  {'total':<14}{self.total / GIB:9.2f} GiB"
                     f"   (peak stage {self.stage}, {self.params_per_gpu / 1e6:.1f}M params/GPU)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_table()

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- parameters
def stage_params(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Parameters held by one GPU of pipeline `stage` (tensor-parallel shard)."""
    t, pp = layout.tp, layout.pp
    n = layers_on_stage(model, layout, stage) * model.layer_params(t)
    emb = model.word_embedding_params(t)  # vocab-parallel embedding shard
    if stage == 0:
        n += emb + model.position_embedding_params()
    if stage == pp - 1:
        n += model.final_norm_params()
        # Untied output layer, or with pp > 1 the last stage keeps its own copy of the tied
        # embedding (Megatron all-reduces the two copies' gradients).
        if model.untie_embeddings or pp > 1:
            n += emb
    return n


def layers_on_stage(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    base, rem = divmod(model.num_layers, layout.pp)
    return base + (1 if stage < rem else 0)


# ----------------------------------------------------------------------------- activations
def _layer_terms(model: ModelShape, layout: ParallelLayout, seq: int, mbs: int) -> dict:
    """Bytes of one layer, one micro-batch, on one GPU, split by what saves them."""
    t, sp = layout.tp, layout.sp
    s = seq // layout.cp  # context parallel: each rank holds s/cp tokens
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    sbh, sbf = s * mbs * h, s * mbs * f
    drop = 1 if model.dropout else 0
    # Replicated over tp without SP (Korthikanti's "10 sbh"): two LayerNorm inputs (2+2),
    # QKV input and fc1 input (the LayerNorm outputs, 2+2) and two 1-byte dropout masks
    # (after the attention projection and after fc2).
    replicated = (4 + 2 + 2 + 2 * drop) * sbh
    # Split over tp (Korthikanti's "24 sbh" for MHA, f = 4h and head dim h/a): Q (2, width
    # q = a*d) and K, V (2 each, width kv, narrower with GQA) kept for the attention
    # backward, attention output = projection input (2q), fc1 output kept by the activation
    # (2f, or 2*2f for SwiGLU) and fc2 input (2f).
    # (local attention repeat_interleaves K, V to all heads and keeps the expanded copies.)
    sbq = s * mbs * model.q_hidden
    kv = model.q_hidden if layout.attention == "local" else model.kv_hidden
    qkv = 2 * sbq + 4 * s * mbs * kv
    mlp = (4 * sbf + 2 * sbf) if model.swiglu else (2 * sbf + 2 * sbf)
    split = qkv + 2 * sbq + mlp
    dense = (replicated + split) // t if sp else replicated + split // t
    if layout.attention == "flash":
        # Flash attention never stores the scores, only the fp32 log-sum-exp per query.
        scores, workspace = 4 * a * s * mbs // t, 0
    else:
        scores, workspace = _scores_bytes(model, s, mbs, t)
    # Input of the layer: the only thing full recompute keeps (sharded by SP).
    layer_input = 2 * sbh // t if sp else 2 * sbh
    return {"dense": dense, "scores": scores, "workspace": workspace, "input": layer_input}


def _scores_bytes(model: ModelShape, s: int, mbs: int, t: int):
    """(stored, workspace) bytes of megatron-core local attention scores, one layer.

    Korthikanti's 5*a*s^2*b assumes a fused fp16 softmax: softmax output (2) + dropout mask
    (1) + dropout output (2). megatron-core's local DotProductAttention defaults to the
    unfused softmax in fp32 (masked_softmax_fusion=False, attention_softmax_in_fp32=True;
    the fused kernel also only supports s <= 4096), which keeps the fp32 softmax output (4)
    + dropout mask (1) + bf16 dropped-out probabilities (2) = 7 bytes per score (6 without
    dropout: the bf16 probabilities kept by the probs @ V matmul).
    Workspace while one layer's attention runs (forward, recompute or backward): the bf16
    QK^T result and its fp32 copy in the forward, or two fp32 gradients of the scores in the
    backward, ~5 bytes per score beyond the stored ones; plus megatron-core's persistent
    global "mpu" buffer of the bf16 QK^T input (2 bytes per score).
    """
    n = model.num_attention_heads * s * s * mbs // t  # score elements per tp rank
    stored = n * (4 + (3 if model.dropout else 2))
    return stored, n * (5 + 2)


def activation_bytes(model: ModelShape, layout: ParallelLayout, stage: int = 0) -> dict:
    """Activation bytes at the peak of pipeline `stage` (1F1B schedule)."""
    mbs, L = layout.micro_batch_size, layers_on_stage(model, layout, stage)
    terms = _layer_terms(model, layout, model.seq_length, mbs)
    full_layer = terms["dense"] + terms["scores"]
    gran = layout.recompute_granularity
    if gran is None:
        stored = L * full_layer
        transient = terms["workspace"]
    elif gran == "selective":
        # Core attention is recomputed in the backward: the scores are not kept (a no-op
        # with flash attention, which never stores them); one layer's scores are rebuilt.
        stored = L * (full_layer - terms["scores"])
        transient = terms["scores"] + terms["workspace"]
    elif layout.recompute_method == "uniform":
        # Megatron "uniform": chunks of N layers, only each chunk's input is checkpointed;
        # the backward recomputes a whole chunk, so N layers' activations live at once.
        n = min(layout.recompute_num_layers, L)
        stored = -(-L // n) * terms["input"] if L else 0
        transient = n * full_layer + terms["workspace"] if L else 0
    else:
        # Megatron "block": the first N layers of the stage are checkpointed one by one,
        # the remaining L - N layers keep their full activations.
        n = min(layout.recompute_num_layers, L)
        stored = n * terms["input"] + (L - n) * full_layer
        transient = (full_layer if n else 0) + terms["workspace"]
    # 1F1B: stage i holds the activations of min(pp - i, m) micro-batches in flight
    # (Narayanan et al. 2021; Korthikanti Sec. 4.2.3: the first stage holds pp).
    in_flight = min(layout.pp - stage, layout.num_microbatches)
    s, h, t, sp = model.seq_length // layout.cp, model.hidden_size, layout.tp, layout.sp
    sbh = s * mbs * h
    extra = 0
    if stage == 0 and model.dropout:
        extra += in_flight * (sbh // t if sp else sbh)  # embedding dropout mask (1 byte)
    if stage == layout.pp - 1:
        # Final LayerNorm input (2) and output-layer input (2), Korthikanti eq. (3).
        extra += in_flight * (4 * sbh // t if sp else 4 * sbh)
    return {"stored": in_flight * stored, "transient": transient, "extra": extra,
            "in_flight": in_flight,
            "total": in_flight * stored + transient + extra}


def logits_bytes(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Loss-time buffers on the last stage: [s, b, V/t] logits.

    The vocab-parallel cross entropy upcasts the bf16 logits to fp32 and keeps the fp32
    softmax for the backward (4 bytes) while the bf16 logits (2 bytes) are still referenced
    by the model's forward: 6 bytes per logit. Not divided by SP (the output layer sees the
    gathered sequence); divided by cp.
    """
    if stage != layout.pp - 1:
        return 0
    s = model.seq_length // layout.cp
    return 6 * s * layout.micro_batch_size * model.padded_vocab(layout.tp) // layout.tp


def largest_transient_bytes(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Largest single tensor allocated and freed during the step on pipeline `stage`: the
    fp32 scores of local attention [b, a/t, s, s], the fp32 logits [s, b, V/t] of the last
    stage, or the fc1 output [s, b, f'/t] (bf16)."""
    s, b, t = model.seq_length // layout.cp, layout.micro_batch_size, layout.tp
    largest = 2 * s * b * model.fc1_width // t
    if layout.attention == "local":
        largest = max(largest, 4 * model.num_attention_heads * s * s * b // t)
    if stage == layout.pp - 1:
        largest = max(largest, 4 * s * b * model.padded_vocab(t) // t)
    return largest


def expandable_segments_enabled() -> bool:
    """True when this process's PyTorch allocator config asks for expandable segments."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") or os.environ.get(
        "PYTORCH_ALLOC_CONF", "")
    return "expandable_segments:true" in conf.replace(" ", "").lower()


# ----------------------------------------------------------------------------- total
def estimate_memory(model: ModelShape, layout: ParallelLayout, dtype_bytes: int = 2, *,
                    grad_bytes: int = 4, include_optimizer: bool = True,
                    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
                    fragmentation: float = DEFAULT_FRAGMENTATION,
                    block_slack: Optional[bool] = None) -> MemoryEstimate:
    """Predicted peak memory per GPU (the largest pipeline stage).

    dtype_bytes: bytes of the model weights/activations (2 = bf16/fp16, 4 = fp32).
    grad_bytes: bytes of Megatron DDP's contiguous main_grad buffer (4: with bf16 Megatron
      accumulates and reduces gradients in fp32).
    include_optimizer: count fp32 master weights + Adam moments (False = forward/backward
      only, e.g. before the first optimizer step).
    overhead_bytes: CUDA context, cuBLAS/NCCL workspaces (not seen by the allocator).
    fragmentation: caching-allocator fragmentation factor on everything else.
    block_slack: add one largest transient allocation for blocks the caching allocator
      cannot merge (module doc). Default: on unless expandable segments are configured.
    """
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")
    if fragmentation < 1.0:
        raise ValueError(f"fragmentation must be >= 1.0, got {fragmentation}")
    if block_slack is None:
        block_slack = not expandable_segments_enabled()
    best = None
    for stage in range(layout.pp):
        p = stage_params(model, layout, stage)
        weights = p * dtype_bytes
        grads = p * grad_bytes
        # Adam: m and v in fp32 (8) + fp32 master copy when training in 16 bit (4); sharded
        # by the distributed optimizer (ZeRO-1, Rajbhandari et al. 2020) over Megatron's
        # data-parallel-with-context-parallel group, dp * cp ranks.
        opt = p * (8 + (4 if dtype_bytes < 4 else 0)) if include_optimizer else 0
        if layout.distributed_optimizer:
            opt = -(-opt // (layout.dp * layout.cp))
        act = activation_bytes(model, layout, stage)
        # The loss runs between the last layer's forward and its backward: at that moment
        # only the stored activations are live, not the recompute/attention workspace.
        logits_raw = logits_bytes(model, layout, stage)
        logits = max(0, logits_raw - act["transient"])
        base = weights + grads + opt + act["total"] + logits
        frag = int(base * (fragmentation - 1.0))
        if block_slack:  # the proportional factor already covers small blocks
            frag = max(frag, largest_transient_bytes(model, layout, stage))
        total = base + frag + int(overhead_bytes)
        if best is None or total > best.total:
            best = MemoryEstimate(
                weights=weights, grads=grads, optimizer=opt, activations=act["total"],
                logits=logits, overhead=int(overhead_bytes), fragmentation=frag, total=total,
                stage=stage, params_per_gpu=p,
                details={**{k: v for k, v in act.items() if k != "total"},
                         "logits_buffers": logits_raw})
    return best
