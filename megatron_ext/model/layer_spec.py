"""GPT layer specs for megatron-core built from megatron_ext modules.

Main API: :func:`get_gpt_block_spec` (pass it to ``GPTModel(transformer_layer_spec=...)``),
:data:`SHARDED_STATE_DICT_KEYS_MAP` and :func:`unfused_norm_key`.

Everything is swapped in through ``ModuleSpec``: megatron-core's ``TransformerLayer``,
``SelfAttention`` and ``MLP`` stay as they are, and only the slots that need a different
implementation get one:

* norms (``input_layernorm``, ``pre_mlp_layernorm``, the block's final norm): :class:`SPNorm`,
  which supports sequence parallelism without apex/TE;
* ``core_attention``: Megatron's ``DotProductAttention`` ("local") or our flash/SDPA module;
* linear layers: Megatron's Column/RowParallelLinear, or GNS-aware subclasses that also
  produce per-sample gradient norms.

Checkpoint keys are megatron-core's: like its own local and Transformer Engine GPT specs,
the layer carries ``sharded_state_dict_keys_map`` (:data:`SHARDED_STATE_DICT_KEYS_MAP`), so
the pre-attention and pre-MLP norms are saved under the names of TE's fused
LayerNorm+linear modules (``self_attention.linear_qkv.layer_norm_weight``, ...). A GPT saved by
Megatron-LM therefore loads into ours and the other way round; checkpoints written before
megatron_ext used the map keep the module names (:func:`unfused_norm_key` gives them).
"""

from __future__ import annotations

from typing import Optional, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_ext.model.norms import SPNorm

#: Our norms' sharded-tensor keys -> megatron-core's (as in its local GPT layer spec).
SHARDED_STATE_DICT_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def unfused_norm_key(key: str) -> str:
    """The key a norm parameter had in checkpoints written without the keys map
    (``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` ->
    ``decoder.layers.input_layernorm.weight``); other keys are returned unchanged."""
    for ours, mapped in SHARDED_STATE_DICT_KEYS_MAP.items():
        if "." + mapped in key:
            return key.replace("." + mapped, "." + ours, 1)
    return key


#: What a layer-spec slot accepts: a module class, or a ModuleSpec with constructor params.
Slot = Union[type, ModuleSpec]


def get_gpt_layer_spec(
    core_attention: Slot = DotProductAttention,
    column_linear: Slot = ColumnParallelLinear,
    row_linear: Slot = RowParallelLinear,
    norm: Slot = SPNorm,
    qk_layernorm: bool = False,
) -> ModuleSpec:
    """One pre-norm GPT transformer layer made of megatron-core modules and our slots.

    A slot takes a class or a ``ModuleSpec`` (whose ``params`` megatron-core's
    ``build_module`` passes to the constructor, e.g. the GNS layers' recorder).
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(SHARDED_STATE_DICT_KEYS_MAP),
        ),
    )


def get_gpt_block_spec(
    config: TransformerConfig,
    layer_spec: Optional[ModuleSpec] = None,
    norm: Slot = SPNorm,
    vp_stage: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The transformer block of this pipeline stage: its layers plus our final norm.

    megatron-core's default block spec would put ``LayerNormImpl`` (apex or the torch
    wrapper that refuses SP) as final norm; listing the layers ourselves avoids that.
    """
    layer_spec = layer_spec or get_gpt_layer_spec(norm=norm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=norm)
