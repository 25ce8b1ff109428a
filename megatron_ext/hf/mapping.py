"""HuggingFace ``config.json`` <-> megatron_ext model flags, and the weight-name tables.

Main API: :func:`architecture`, :func:`model_flags` (config.json -> ``pretrain_gpt.py`` model
flags), :func:`hf_config` (our ModelConfig values -> config.json fields),
:data:`LAYOUTS` (per architecture: HF names and how each of our parameters is made from them),
:class:`Unsupported`.

Pure Python (no torch, no transformers). Two families are mapped:

* ``llama``: RoPE (HF's ``rotate_half`` is megatron-core's non-interleaved rotary layout, so
  q/k need no permutation), RMSNorm, SwiGLU (our ``linear_fc1`` = [gate; up]), grouped-query
  attention, tied or untied embeddings; ``rope_theta`` -> ``--rotary-base``, ``rope_scaling``
  ``linear`` -> ``--rotary-seq-len-interpolation-factor``, ``llama3`` -> ``--use-rope-scaling
  --rope-scaling-factor`` (megatron-core fixes low/high frequency factors 1 and 4 and the
  original context 8192; other values are refused);
* ``gpt2``: learned positions, LayerNorm, GeLU (``gelu_new`` -> ``--openai-gelu``), biases
  everywhere, Conv1D weights (stored [in, out]) and the fused ``c_attn`` [q | k | v].

Our ``linear_qkv`` holds, per query group, that group's query heads, then its key head, then
its value head (megatron-core's layout); the ``qkv`` transforms interleave/split accordingly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

LLAMA, GPT2 = "llama", "gpt2"
_OPENAI_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_UNTIE = "--untie-embeddings-and-output-weights"
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


class Unsupported(ValueError):
    """A model or flag combination the converter cannot map (one line: what and why)."""


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise Unsupported(message)


def architecture(hf: Dict[str, Any]) -> str:
    """``llama`` or ``gpt2`` from config.json's ``model_type``."""
    kind = hf.get("model_type")
    _need(kind in (LLAMA, GPT2), f"config.json model_type {kind!r} is not supported: the "
                                 "converter maps Llama-family ('llama') and GPT-2 ('gpt2') models")
    return kind


def _rope(hf: Dict[str, Any]) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(rope_theta, rope scaling or None) from transformers 5's ``rope_parameters`` or the
    older ``rope_theta``/``rope_scaling`` keys."""
    params = hf.get("rope_parameters")
    if params:
        scaling = dict(params)
        theta = scaling.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (None if kind == "default" else {**scaling, "rope_type": kind})


def _rope_flags(hf: Dict[str, Any]) -> List[str]:
    theta, scaling = _rope(hf)
    _need(float(theta).is_integer(), f"rope_theta {theta} is not an integer (--rotary-base "
                                     "takes one)")
    _need(hf.get("partial_rotary_factor", 1.0) == 1.0,
          "partial_rotary_factor != 1 has no Llama equivalent in transformers")
    flags = ["--rotary-base", str(int(theta))]
    if scaling is None:
        return flags
    kind, factor = scaling["rope_type"], scaling.get("factor")
    if kind == "linear":
        return flags + ["--rotary-seq-len-interpolation-factor", repr(float(factor))]
    _need(kind == "llama3", f"rope_scaling type {kind!r} has no megatron-core 0.16.1 "
                            "equivalent here (supported: linear, llama3)")
    fixed = {k: scaling.get(k) for k in _LLAMA3_FIXED}
    _need(all(float(fixed[k] or 0) == v for k, v in _LLAMA3_FIXED.items()),
          f"rope_scaling llama3 with {fixed}: megatron-core fixes these to {_LLAMA3_FIXED}")
    return flags + ["--use-rope-scaling", "--rope-scaling-factor", repr(float(factor))]


def _llama_flags(hf: Dict[str, Any]) -> List[str]:
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    _need(hf.get("hidden_act", "silu") == "silu",
          f"hidden_act {hf.get('hidden_act')!r}: only SwiGLU (silu) maps to --swiglu")
    bias = hf.get("attention_bias", False)
    _need(bias == hf.get("mlp_bias", False), "attention_bias != mlp_bias: megatron-core has "
                                              "one --disable-bias-linear for both")
    flags = ["--num-layers", hf["num_hidden_layers"], "--hidden-size", h,
             "--ffn-hidden-size", hf["intermediate_size"], "--num-attention-heads", heads]
    if groups != heads:
        flags += ["--num-query-groups", groups]
    if head_dim * heads != h:
        flags += ["--kv-channels", head_dim]
    flags += ["--max-position-embeddings", hf["max_position_embeddings"],
              "--position-embedding-type", "rope", "--normalization", "RMSNorm",
              "--norm-epsilon", repr(float(hf.get("rms_norm_eps", 1e-6))), "--swiglu"]
    flags += [] if bias else ["--disable-bias-linear"]
    flags += [] if hf.get("tie_word_embeddings", False) else [_UNTIE]
    return [str(f) for f in flags] + _rope_flags(hf)


def _gpt2_flags(hf: Dict[str, Any]) -> List[str]:
    act = hf.get("activation_function", "gelu_new")
    _need(act in _OPENAI_GELU + ("gelu",), f"activation_function {act!r} is not a GeLU")
    _need(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx"),
          "GPT-2 attention must be scaled by 1/sqrt(head_dim) only (scale_attn_weights true, "
          "scale_attn_by_inverse_layer_idx false)")
    h = hf["n_embd"]
    flags = ["--num-layers", hf["n_layer"], "--hidden-size", h,
             "--ffn-hidden-size", hf.get("n_inner") or 4 * h, "--num-attention-heads", hf["n_head"],
             "--max-position-embeddings", hf["n_positions"],
             "--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm",
             "--norm-epsilon", repr(float(hf.get("layer_norm_epsilon", 1e-5)))]
    flags += ["--openai-gelu"] if act in _OPENAI_GELU else []
    flags += [] if hf.get("tie_word_embeddings", True) else [_UNTIE]
    return [str(f) for f in flags]


def model_flags(hf: Dict[str, Any]) -> List[str]:
    """The ``pretrain_gpt.py`` model flags of a HuggingFace config.json (as a dict)."""
    arch = architecture(hf)
    _need("vocab_size" in hf, "config.json has no 'vocab_size'")
    try:
        return _llama_flags(hf) if arch == LLAMA else _gpt2_flags(hf)
    except KeyError as e:  # a field the mapping needs: one line, not a trace
        raise Unsupported(f"config.json has no {e.args[0]!r}, which a {arch} model "
                          "needs") from None


def _export_architecture(m: Dict[str, Any]) -> str:
    if (m["position_embedding_type"], m["normalization"], m["swiglu"]) == ("rope", "RMSNorm", True):
        return LLAMA
    _need((m["position_embedding_type"], m["normalization"], m["swiglu"])
          == ("learned_absolute", "LayerNorm", False),
          "this model has no HuggingFace equivalent here: export maps Llama (rope, RMSNorm, "
          "--swiglu) and GPT-2 (learned_absolute, LayerNorm, GeLU) models")
    return GPT2


def _llama_rope(m: Dict[str, Any]) -> Dict[str, Any]:
    linear, llama3 = m["rotary_seq_len_interpolation_factor"], m["use_rope_scaling"]
    _need(m["rotary_percent"] == 1.0, "--rotary-percent < 1 has no Llama equivalent")
    _need(not (linear and llama3), "--rotary-seq-len-interpolation-factor together with "
                                   "--use-rope-scaling has no HuggingFace equivalent")
    scaling = None
    if linear:
        scaling = {"rope_type": "linear", "factor": float(linear)}
    elif llama3:
        scaling = {"rope_type": "llama3", "factor": float(m["rope_scaling_factor"]),
                   **_LLAMA3_FIXED}
    return {"rope_theta": float(m["rotary_base"]), "rope_scaling": scaling}


def hf_config(m: Dict[str, Any], vocab_size: int,
              base: Optional[Dict[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """(architecture, config fields) of our ModelConfig values ``m`` for a vocabulary of
    ``vocab_size``; fields of ``base`` (the imported config.json) the model does not decide,
    such as token ids, are kept."""
    arch = _export_architecture(m)
    _need(not m["qk_layernorm"], "--qk-layernorm has no Llama/GPT-2 equivalent")
    h, heads = m["hidden_size"], m["num_attention_heads"]
    keep = {k: v for k, v in (base or {}).items() if base.get("model_type") == arch
            and k not in ("rope_parameters", "rope_theta", "rope_scaling", "transformers_version",
                          "dtype", "torch_dtype", "architectures")}
    common = {"vocab_size": vocab_size,
              "tie_word_embeddings": not m["untie_embeddings_and_output_weights"]}
    if arch == LLAMA:
        bias = not m["disable_bias_linear"]
        return arch, {**keep, **common, "model_type": LLAMA, "architectures": ["LlamaForCausalLM"],
                      "hidden_size": h, "intermediate_size": m["ffn_hidden_size"] or 4 * h,
                      "num_hidden_layers": m["num_layers"], "num_attention_heads": heads,
                      "num_key_value_heads": m["num_query_groups"] or heads,
                      "head_dim": m["kv_channels"] or h // heads, "hidden_act": "silu",
                      "max_position_embeddings": m["max_position_embeddings"],
                      "rms_norm_eps": m["norm_epsilon"], "attention_bias": bias,
                      "mlp_bias": bias, **_llama_rope(m)}
    _need(not m["disable_bias_linear"], "GPT-2 has biases: drop --disable-bias-linear")
    ffn = m["ffn_hidden_size"]
    return arch, {**keep, **common, "model_type": GPT2, "architectures": ["GPT2LMHeadModel"],
                  "n_embd": h, "n_layer": m["num_layers"], "n_head": heads,
                  "n_inner": None if ffn in (None, 4 * h) else ffn,
                  "n_positions": m["max_position_embeddings"],
                  "layer_norm_epsilon": m["norm_epsilon"],
                  "activation_function": "gelu_new" if m["openai_gelu"] else "gelu"}


# Weight tables: our parameter (a suffix under ``decoder.layers.<i>.`` for per-layer ones)
# -> (HF tensors, under the layer prefix for per-layer ones; transform). Transforms:
# None (same tensor), "cat" (concatenated rows), "qkv" (q, k, v interleaved per query group),
# "fused_qkv" (GPT-2's c_attn: [in, out] -> rows, then as "qkv"), "t" (Conv1D: transposed),
# "vocab" (rows padded to the padded vocabulary).
_LLAMA_LAYER = {
    "input_layernorm.weight": (["input_layernorm.weight"], None),
    "pre_mlp_layernorm.weight": (["post_attention_layernorm.weight"], None),
    "self_attention.linear_proj.weight": (["self_attn.o_proj.weight"], None),
    "self_attention.linear_proj.bias": (["self_attn.o_proj.bias"], None),
    "mlp.linear_fc2.weight": (["mlp.down_proj.weight"], None),
    "mlp.linear_fc2.bias": (["mlp.down_proj.bias"], None),
}
for _kind in ("weight", "bias"):
    _LLAMA_LAYER[f"self_attention.linear_qkv.{_kind}"] = (
        [f"self_attn.{p}_proj.{_kind}" for p in "qkv"], "qkv")
    _LLAMA_LAYER[f"mlp.linear_fc1.{_kind}"] = (
        [f"mlp.{p}_proj.{_kind}" for p in ("gate", "up")], "cat")

_GPT2_LAYER = {}
for _ours, _theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2"),
                       ("self_attention.linear_qkv", "attn.c_attn"),
                       ("self_attention.linear_proj", "attn.c_proj"),
                       ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
    for _kind in ("weight", "bias"):
        _conv1d = "linear" in _ours and _kind == "weight"  # Conv1D: [in, out]
        _transform = "fused_qkv" if "qkv" in _ours else ("t" if _conv1d else None)
        _GPT2_LAYER[f"{_ours}.{_kind}"] = ([f"{_theirs}.{_kind}"], _transform)

#: architecture -> (HF per-layer prefix, per-layer table, global table, ignored HF buffers)
LAYOUTS = {
    LLAMA: ("model.layers.{}.", _LLAMA_LAYER, {
        "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], "vocab"),
        "decoder.final_layernorm.weight": (["model.norm.weight"], None),
        "output_layer.weight": (["lm_head.weight"], "vocab"),
    }, ("rotary_emb.inv_freq",)),
    GPT2: ("transformer.h.{}.", _GPT2_LAYER, {
        "embedding.word_embeddings.weight": (["transformer.wte.weight"], "vocab"),
        "embedding.position_embeddings.weight": (["transformer.wpe.weight"], None),
        "decoder.final_layernorm.weight": (["transformer.ln_f.weight"], None),
        "decoder.final_layernorm.bias": (["transformer.ln_f.bias"], None),
        "output_layer.weight": (["lm_head.weight"], "vocab"),
    }, ("attn.bias", "attn.masked_bias")),
}


def hf_names(arch: str, ours: str) -> Tuple[List[str], Optional[str]]:
    """(HF tensor names, transform) that make our canonical parameter ``ours``."""
    layer_prefix, per_layer, global_table, _ = LAYOUTS[arch]
    if ours in global_table:
        return global_table[ours]
    head, _, rest = ours.partition("decoder.layers.")
    number, _, suffix = rest.partition(".")
    _need(head == "" and number.isdigit() and suffix in per_layer,
          f"parameter {ours} has no {arch} counterpart")
    names, transform = per_layer[suffix]
    return [layer_prefix.format(number) + n for n in names], transform


__all__ = ["LLAMA", "GPT2", "LAYOUTS", "Unsupported", "architecture", "hf_config", "hf_names",
           "model_flags"]
