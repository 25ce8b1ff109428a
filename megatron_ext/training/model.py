"""Build the megatron-core GPT model of a training run.

Main API: :func:`build_gpt` (config + core attention + model + DDP of a job),
:func:`build_optimizer`, and underneath :func:`build_transformer_config`, :func:`build_model`,
:func:`init_weights_by_name`, :func:`load_weights_by_name` (full weights, e.g. converted from
HuggingFace, into this rank's shards).

Everything that builds a GPT for training (the loop, the GNS tests, the benchmarks) calls
:func:`build_gpt` with a :class:`~megatron_ext.training.job.JobConfig`; features change the
model only through :class:`~megatron_ext.training.hooks.ModelOptions` (layer-spec slots and,
for the embedding/output layer that GPTModel builds itself, a GPTModel subclass).

Parameters are initialised by *name* (:func:`init_weights_by_name`): every parameter's full,
unsharded tensor is drawn from a generator seeded by (seed, global parameter name) and the
rank keeps its tensor-parallel shard. A model therefore starts from the same weights
whatever its TP/PP/DP layout, which makes "TP=2+SP, PP=2, DP=2 give the loss curve of
TP=1" a testable property (Megatron's own init draws per pipeline stage, so PP changes it).
The same naming lets :func:`load_weights_by_name` give every rank its shards of full tensors.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import openai_gelu

from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec
from megatron_ext.model.norms import SPNorm
from megatron_ext.training.hooks import ModelOptions


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: a multiple of ``divisible_by * tp`` so every TP shard is equal."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _deferred_init(weight: torch.Tensor) -> torch.Tensor:
    """Megatron's init_method slot: leave the tensor as is, `init_weights_by_name` fills it.

    Saves a third of model-building time (one normal draw of every weight instead of two).
    """
    return weight


def _activation(m) -> Callable:
    if m.swiglu:
        return torch.nn.functional.silu
    return openai_gelu if m.openai_gelu else torch.nn.functional.gelu


def build_transformer_config(job) -> TransformerConfig:
    """megatron-core's TransformerConfig for a :class:`JobConfig`."""
    m, p, r, t = job.model, job.parallel, job.recompute, job.training
    dtype = torch.bfloat16 if t.bf16 else (torch.float16 if t.fp16 else torch.float32)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=_activation(m),
        add_bias_linear=not m.disable_bias_linear,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=job.cp,
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=r.recompute_granularity,
        recompute_method=r.recompute_method,
        recompute_num_layers=r.recompute_num_layers,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Exact per-token mean over the whole global batch (also right under CP, where ranks
        # hold different numbers of loss tokens): grads are divided by the token count in
        # finalize_model_grads instead of by the number of micro-batches.
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
        # Megatron must run its init (it sets the tensor-parallel attributes there), but the
        # values are overwritten by `init_weights_by_name`: skip drawing them twice.
        perform_initialization=True,
        init_method=_deferred_init,
        output_layer_init_method=_deferred_init,
        embedding_init_method=_deferred_init,
        # Fusions that need apex/TE/CUDA kernels stay off; torch does the same math.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def dp_reduction_settings(job) -> Tuple[bool, int]:
    """(distributed optimizer?, its instances) of this run: the instances are the groups
    that :func:`~megatron_ext.training.initialize.initialize_megatron` asked megatron-core
    for (``--dp-reduction``), read back from its parallel state."""
    from megatron_ext.training.dp_reduction import distributed_optimizer_in_use, optimizer_instances

    return distributed_optimizer_in_use(job), optimizer_instances()


def build_model(job, config: TransformerConfig, padded_vocab: int, core_attention: type,
                options: Optional[ModelOptions] = None) -> Tuple[GPTModel, DistributedDataParallel]:
    """GPTModel of this pipeline stage, initialised by name, wrapped for DDP.

    Returns ``(gpt_model, ddp_model)``: the first is the unwrapped module (for checkpoints),
    the second is what the schedule and the optimizer use.
    """
    m, options = job.model, options or ModelOptions()
    slots = {"norm": SPNorm, **options.layer_specs}
    layer_spec = get_gpt_layer_spec(core_attention=core_attention, qk_layernorm=m.qk_layernorm,
                                    **slots)
    block_spec = get_gpt_block_spec(config, layer_spec, norm=slots["norm"])
    model_class = options.model_class or GPTModel
    model = model_class(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab,
        max_sequence_length=m.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        rotary_percent=m.rotary_percent,
        seq_len_interpolation_factor=m.rotary_seq_len_interpolation_factor,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        **options.model_kwargs,
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    model.to(device)
    init_weights_by_name(model, config, job.training.seed)  # drawn where the model lives
    wrapped = Float16Module(config, model) if (config.bf16 or config.fp16) else model
    distributed_optimizer, instances = dp_reduction_settings(job)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=job.parallel.overlap_grad_reduce,
            use_distributed_optimizer=distributed_optimizer,
            # --dp-reduction hierarchical: one optimizer instance per node (reduce-scatter
            # inside it, all-reduce of the shard across instances); see dp_reduction.py.
            num_distributed_optimizer_instances=instances,
            # NaN/Inf gradients stop training with a clear error (errors.TrainingDiverged);
            # fp16 instead relies on the loss scaler, which skips steps with Inf grads.
            check_for_nan_in_grad=not config.fp16,
        ),
        wrapped,
    )
    return model, ddp


@dataclass
class BuiltGPT:
    """What :func:`build_gpt` returns."""

    config: TransformerConfig
    gpt: GPTModel
    """The unwrapped model of this pipeline stage (checkpoints, parameter counts)."""
    ddp: DistributedDataParallel
    """What the schedule and the optimizer use."""
    attention: str
    """Which core-attention implementation runs (for the startup line)."""


def build_gpt(job, padded_vocab: int, options: Optional[ModelOptions] = None) -> BuiltGPT:
    """The GPT of ``job`` on this rank, with megatron-core's ``finalize_model_grads``."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_ext.model.attention import get_core_attention

    config = build_transformer_config(job)
    config.finalize_model_grads_func = finalize_model_grads
    core_attention, description = get_core_attention(job.attention)
    gpt, ddp = build_model(job, config, padded_vocab, core_attention, options)
    return BuiltGPT(config, gpt, ddp, description)


def build_optimizer(job, config: TransformerConfig, ddp):
    """megatron-core's optimizer of ``job`` (mixed precision, clipping, distributed optimizer)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, t = job.optimizer, job.training
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.optimizer, lr=job.schedule.lr, min_lr=job.schedule.min_lr,
            weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum, clip_grad=o.clip_grad,
            bf16=t.bf16, fp16=t.fp16, params_dtype=config.params_dtype,
            use_distributed_optimizer=dp_reduction_settings(job)[0]),
        [ddp])


def _global_layer_prefixes(model: torch.nn.Module) -> Dict[str, int]:
    """Map ``decoder.layers.<local>.`` to the 1-based global layer number."""
    return {
        name + ".": module.layer_number
        for name, module in model.named_modules()
        if isinstance(module, TransformerLayer)
    }


def canonical_param_names(model: GPTModel) -> Dict[str, str]:
    """``{parameter name: canonical name}`` of this rank's parameters (see
    :func:`canonical_param_name`)."""
    prefixes = _global_layer_prefixes(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    return {name: canonical_param_name(name, prefixes, tied)
            for name, _ in model.named_parameters()}


def canonical_param_name(name: str, layer_prefixes: Dict[str, int], tied_output: bool) -> str:
    """A name that is the same for a parameter under any pipeline split."""
    for prefix, number in layer_prefixes.items():
        if name.startswith(prefix):
            return f"decoder.layers.{number - 1}." + name[len(prefix):]
    if tied_output and name == "output_layer.weight":
        # The last stage's copy of a tied embedding must start equal to the embedding.
        return "embedding.word_embeddings.weight"
    return name


_SCALED_INIT = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def _assign_by_name(model: GPTModel, full_tensor: Callable) -> None:
    """Set every parameter to this rank's TP shard of ``full_tensor(canonical name, full
    shape, param)`` (the unsharded tensor, on the parameter's device)."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    canonical = canonical_param_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            canon = canonical[name]
            full_shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded:
                full_shape[param.partition_dim] *= tp_size
            full = full_tensor(canon, full_shape, param)
            if sharded:
                full = _tp_shard(full, param.partition_dim, getattr(param, "partition_stride", 1), tp_rank, tp_size)
            param.copy_(full.to(param.dtype))


def init_weights_by_name(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    """Re-initialise every parameter from (seed, global name) and keep this rank's TP shard.

    Same distributions as Megatron: normal(0, std) for matrices and embeddings,
    normal(0, std / sqrt(2 * num_layers)) for the output projections of attention and MLP
    (GPT-2's scaled init), zeros for biases, ones (zeros if zero-centred) for norm weights.
    Values are drawn on the parameters' device with that device's generator, so a GPU run
    starts from other (but again layout-independent) weights than a CPU run of the same seed.
    """
    std = config.init_method_std
    scaled_std = std / (2.0 * config.num_layers) ** 0.5

    def draw(canon: str, full_shape, param) -> torch.Tensor:
        dev = param.device
        if canon.endswith("bias"):
            return torch.zeros(full_shape, device=dev)
        if param.dim() == 1:  # norm weights
            fill = torch.zeros if config.layernorm_zero_centered_gamma else torch.ones
            return fill(full_shape, device=dev)
        gen = torch.Generator(device=dev).manual_seed(
            (seed * 1_000_003 + zlib.crc32(canon.encode())) % (2**63))
        sigma = scaled_std if _SCALED_INIT.search(canon) else std
        return torch.empty(full_shape, device=dev).normal_(0.0, sigma, generator=gen)

    _assign_by_name(model, draw)


def load_weights_by_name(model: GPTModel, weights: Mapping[str, torch.Tensor]) -> None:
    """Set every parameter from ``weights``: full (unsharded) tensors under canonical names
    (:func:`canonical_param_name`: global layer numbers, TP=1 shapes); this rank keeps its
    shards. A missing name or a wrong shape raises ``ValueError`` naming it."""
    def take(canon: str, full_shape, param) -> torch.Tensor:
        if canon not in weights:
            raise ValueError(f"no weights for parameter {canon}")
        full = weights[canon]
        if list(full.shape) != list(full_shape):
            raise ValueError(f"{canon}: weights of shape {list(full.shape)} for a parameter "
                             f"of shape {list(full_shape)}")
        return full.to(param.device)

    _assign_by_name(model, take)


def _tp_shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    # Same split as megatron's _initialize_affine_weight_cpu: chunks of size/(world*stride),
    # rank r keeps chunks r, r+world, ... (stride > 1 for fused gate/up projections).
    per = full.shape[dim] // (world * stride)
    chunks = torch.split(full, per, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)

