"""Build the megatron-core GPT model of a training run.

Main API: :func:`build_transformer_config`, :func:`build_model`, :func:`init_weights_by_name`.

Parameters are initialised by *name* (:func:`init_weights_by_name`): every parameter's full,
unsharded tensor is drawn from a generator seeded by (seed, global parameter name) and the
rank keeps its tensor-parallel shard. A model therefore starts from the same weights
whatever its TP/PP/DP layout, which makes "TP=2+SP, PP=2, DP=2 give the loss curve of
TP=1" a testable property (Megatron's own init draws per pipeline stage, so PP changes it).
"""

from __future__ import annotations

import argparse
import re
import zlib
from typing import Dict, Optional, Tuple

import torch

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec
from megatron_ext.model.norms import SPNorm


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: a multiple of ``divisible_by * tp`` so every TP shard is equal."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _deferred_init(weight: torch.Tensor) -> torch.Tensor:
    """Megatron's init_method slot: leave the tensor as is, `init_weights_by_name` fills it.

    Saves a third of model-building time (one normal draw of every weight instead of two).
    """
    return weight


def build_transformer_config(args: argparse.Namespace) -> TransformerConfig:
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=not args.disable_bias_linear,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        bf16=args.bf16,
        fp16=args.fp16,
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


def build_model(
    args: argparse.Namespace,
    config: TransformerConfig,
    vocab_size: int,
    core_attention: type,
    linear_classes: Optional[Tuple[type, type]] = None,
    norm_class: Optional[type] = None,
) -> Tuple[GPTModel, DistributedDataParallel]:
    """GPTModel of this pipeline stage, initialised by name, wrapped for DDP.

    Returns ``(gpt_model, ddp_model)``: the first is the unwrapped module (for checkpoints and
    hooks), the second is what the schedule and the optimizer use.
    """
    norm = norm_class or SPNorm
    spec_kwargs = {"core_attention": core_attention, "norm": norm}
    if linear_classes is not None:
        spec_kwargs["column_linear"], spec_kwargs["row_linear"] = linear_classes
    layer_spec = get_gpt_layer_spec(qk_layernorm=args.qk_layernorm, **spec_kwargs)
    block_spec = get_gpt_block_spec(config, layer_spec, norm=norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(
            vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        ),
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    model.to(device)
    init_weights_by_name(model, config, args.seed)  # drawn where the model lives (fast on GPU)
    wrapped = Float16Module(config, model) if (args.bf16 or args.fp16) else model
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
            # NaN/Inf gradients stop training with a clear error (loop.TrainingDiverged);
            # fp16 instead relies on the loss scaler, which skips steps with Inf grads.
            check_for_nan_in_grad=not args.fp16,
        ),
        wrapped,
    )
    return model, ddp


def _global_layer_prefixes(model: torch.nn.Module) -> Dict[str, int]:
    """Map ``decoder.layers.<local>.`` to the 1-based global layer number."""
    return {
        name + ".": module.layer_number
        for name, module in model.named_modules()
        if isinstance(module, TransformerLayer)
    }


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


def init_weights_by_name(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    """Re-initialise every parameter from (seed, global name) and keep this rank's TP shard.

    Same distributions as Megatron: normal(0, std) for matrices and embeddings,
    normal(0, std / sqrt(2 * num_layers)) for the output projections of attention and MLP
    (GPT-2's scaled init), zeros for biases, ones (zeros if zero-centred) for norm weights.
    Values are drawn on the parameters' device with that device's generator, so a GPU run
    starts from other (but again layout-independent) weights than a CPU run of the same seed.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    prefixes = _global_layer_prefixes(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    std = config.init_method_std
    scaled_std = std / (2.0 * config.num_layers) ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            canon = canonical_param_name(name, prefixes, tied)
            full_shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded:
                full_shape[param.partition_dim] *= tp_size
            dev = param.device
            gen = torch.Generator(device=dev).manual_seed(
                (seed * 1_000_003 + zlib.crc32(canon.encode())) % (2**63)
            )
            if canon.endswith("bias"):
                full = torch.zeros(full_shape, device=dev)
            elif param.dim() == 1:  # norm weights
                fill = torch.zeros if config.layernorm_zero_centered_gamma else torch.ones
                full = fill(full_shape, device=dev)
            else:
                sigma = scaled_std if _SCALED_INIT.search(canon) else std
                full = torch.empty(full_shape, device=dev).normal_(0.0, sigma, generator=gen)
            if sharded:
                full = _tp_shard(full, param.partition_dim, getattr(param, "partition_stride", 1), tp_rank, tp_size)
            param.copy_(full.to(param.dtype))


def _tp_shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    # Same split as megatron's _initialize_affine_weight_cpu: chunks of size/(world*stride),
    # rank r keeps chunks r, r+world, ... (stride > 1 for fused gate/up projections).
    per = full.shape[dim] // (world * stride)
    chunks = torch.split(full, per, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)

