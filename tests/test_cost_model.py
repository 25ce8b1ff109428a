"""Tests of megatron_ext.cost_model: FLOPs by hand, the classic closed form, and parameter
counts against the GPTs that training builds from the same flags (``parse_job`` ->
``job.model_shape`` vs ``build_gpt``, on CPU in a single process)."""
import argparse
import subprocess
import sys

import pytest

from megatron_ext.cost_model import ModelShape, add_model_shape_args


# ----------------------------------------------------------------------------- FLOPs
def test_flops_swiglu_gqa_no_bias_by_hand():
    m = ModelShape(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                   vocab_size=257, ffn_hidden_size=96, num_query_groups=2, swiglu=True,
                   add_bias_linear=False)
    # d = 64 / 4 = 16, q = 4 * 16 = 64, kv = 2 * 16 = 32, V = 257 padded to 3 * 128 = 384.
    assert (m.kv_channels, m.q_hidden, m.kv_hidden, m.padded_vocab()) == (16, 64, 32, 384)
    # Forward FLOPs of one token in one layer (2 per multiply-add):
    qkv = 2 * 64 * (64 + 2 * 32)        # 16384: h -> q + 2kv
    proj = 2 * 64 * 64                  # 8192:  q -> h
    fc1 = 2 * 64 * (2 * 96)             # 24576: h -> 2f (gate and value)
    fc2 = 2 * 96 * 64                   # 12288: f -> h
    attention = (2 * 32 * 64 + 2 * 32 * 64) // 2  # 4096: QK^T + PV over s keys, causal half
    layer = qkv + proj + fc1 + fc2 + attention
    assert layer == 65536
    logits = 2 * 64 * 384               # 49152
    assert m.forward_flops_per_token() == {"layers": 2 * (qkv + proj + fc1 + fc2),
                                           "attention": 2 * attention, "logits": logits}
    forward_per_token = 2 * layer + logits  # 180224
    assert m.flops_per_sample() == 3 * 32 * forward_per_token == 17_301_504
    # The same with Megatron-LM's grouping: 6[h(q+2kv) + qh + qs] + 6hf*3 per layer + 6hV.
    megatron = 2 * (6 * (64 * 128 + 64 * 64 + 64 * 32) + 6 * 64 * 96 * 3) + 6 * 64 * 384
    assert m.flops_per_sample() == 32 * megatron


def test_flops_gelu_mha_closed_form():
    """GeLU, MHA, f = 4h: per token and layer 6[3h^2 + h^2 + hs] + 6h(4h)2 = 72h^2 + 6hs,
    plus 6hV for the logits, so one sequence costs
        s L (72 h^2 + 6 h s) + 6 s h V = 72 s L h^2 (1 + s/(12h) + V/(12 L h)).
    (Narayanan et al.'s s/(6h) counts the full s x s scores; the causal mask halves them.)"""
    L, h, a, s, V = 24, 2048, 16, 2048, 50304  # 50304 = 393 * 128: no padding
    m = ModelShape(L, h, a, s, V)
    assert m.flops_per_sample() == 72 * s * L * h * h + 6 * s * s * L * h + 6 * s * h * V
    assert m.flops_per_sample() == pytest.approx(
        72 * s * L * h ** 2 * (1 + s / (12 * h) + V / (12 * L * h)), rel=1e-12)
    # biases and norms have no matmul FLOPs; the logits use the vocab padded for tp
    assert m.flops_per_sample() == ModelShape(L, h, a, s, V, add_bias_linear=False,
                                              normalization="RMSNorm").flops_per_sample()
    assert m.flops_per_sample(tp=4) - m.flops_per_sample() == 6 * s * h * (99 * 512 - V)


def test_padded_vocab_and_layer_shards():
    m = ModelShape(2, 64, 4, 32, 257, make_vocab_size_divisible_by=64)
    assert [m.padded_vocab(t) for t in (1, 2, 4)] == [320, 384, 512]
    m = ModelShape(2, 64, 4, 32, 257, add_bias_linear=False, normalization="RMSNorm")
    h = 64
    assert m.layer_params(1) == 12 * h * h + 2 * h
    assert m.layer_params(2) == 6 * h * h + 2 * h  # weights split, norm weights replicated


# ----------------------------------------------------------------------------- parameters
def test_num_params_formula_gpt2_small():
    h, m = 768, ModelShape(12, 768, 12, 1024, 50257, untie_embeddings=False,
                           position_embedding_type="learned_absolute")
    # GPT-2 small: 12h^2 + 13h per layer, (V_padded + s) h embeddings, final LayerNorm 2h.
    assert m.num_params() == 12 * (12 * h * h + 13 * h) + (50304 + 1024) * h + 2 * h


# Model flags on top of a 2-layer, h=64, 4-head, 32-token GPT with tied embeddings and a
# vocabulary of 257 tokens (padded by --make-vocab-size-divisible-by, default 128).
CONFIGS = {
    "gelu-mha-bias-layernorm-tied-rope": [],
    "swiglu-gqa-nobias-rmsnorm-untied-rope-qkln": [
        "--swiglu", "--num-query-groups", "2", "--disable-bias-linear",
        "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights", "--qk-layernorm",
        "--ffn-hidden-size", "96"],
    "gelu-mqa-bias-untied-learned-kvchannels-qkln": [
        "--num-query-groups", "1", "--untie-embeddings-and-output-weights",
        "--position-embedding-type", "learned_absolute", "--max-position-embeddings", "48",
        "--kv-channels", "24", "--ffn-hidden-size", "100", "--qk-layernorm",
        "--make-vocab-size-divisible-by", "64"],
    "swiglu-mha-bias-rmsnorm-tied-learned": [
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "learned_absolute"],
}
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32"]
VOCAB = 257


@pytest.fixture(scope="module")
def one_rank():
    """A world of one on CPU with megatron's parallel state (tp = pp = 1), set up as
    training does (``initialize_megatron``)."""
    pytest.importorskip("torch")
    from gpt_helpers import one_rank_megatron

    from megatron_ext.training.job import parse_job

    with one_rank_megatron(parse_job(BASE, world_size=1)):
        yield


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_num_params_matches_megatron_gpt_model(one_rank, name):
    from gpt_helpers import build

    from megatron_ext.training.job import parse_job

    job = parse_job(BASE + CONFIGS[name], world_size=1)
    m = job.model_shape(VOCAB)  # what the cost model (and the training log) counts
    model = build(job, VOCAB).gpt  # what training builds
    assert m.num_params() == sum(p.numel() for p in model.parameters())
    layer = model.decoder.layers[0]
    assert m.layer_params() == sum(p.numel() for p in layer.parameters())
    # the flags reached the model: untied output weights and learned positions are parameters
    assert (model.output_layer.weight is not None) == m.untie_embeddings
    assert hasattr(model.embedding, "position_embeddings") == (
        m.position_embedding_type == "learned_absolute")


# ----------------------------------------------------------------------------- flags & purity
def test_from_megatron_args_maps_flags():
    p = argparse.ArgumentParser()
    add_model_shape_args(p)
    args = p.parse_args("--num-layers 2 --hidden-size 64 --num-attention-heads 4 "
                        "--seq-length 32 --num-query-groups 2 --swiglu --disable-bias-linear "
                        "--normalization RMSNorm --position-embedding-type learned_absolute "
                        "--max-position-embeddings 64 --qk-layernorm --kv-channels 8 "
                        "--make-vocab-size-divisible-by 64".split())
    m = ModelShape.from_megatron_args(args, vocab_size=257)
    assert (m.num_query_groups, m.swiglu, m.add_bias_linear, m.normalization) == (
        2, True, False, "RMSNorm")
    assert (m.position_embedding_type, m.max_position_embeddings, m.qk_layernorm) == (
        "learned_absolute", 64, True)
    assert (m.kv_channels, m.padded_vocab(), m.untie_embeddings) == (8, 320, False)
    assert m.dropout  # no dropout flags: Megatron-LM's default 0.1
    ns = argparse.Namespace(**vars(args), hidden_dropout=0.0, attention_dropout=0.0)
    assert not ModelShape.from_megatron_args(ns).dropout and ns.vocab_size == 50304


@pytest.mark.parametrize("kw", [dict(hidden_size=65), dict(num_query_groups=3),
                                dict(normalization="BatchNorm"), dict(kv_channels=0),
                                dict(position_embedding_type="alibi"),
                                dict(position_embedding_type="learned_absolute",
                                     max_position_embeddings=16)])
def test_validation(kw):
    with pytest.raises(ValueError):
        ModelShape(**{**dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                             seq_length=32, vocab_size=257), **kw})


def test_kv_channels_allows_any_hidden_size():
    m = ModelShape(2, 65, 4, 32, 257, kv_channels=16)
    assert m.q_hidden == 64 and m.kv_hidden == 64


def test_cost_model_imports_no_torch():
    code = ("import sys, megatron_ext.cost_model; "
            "assert 'torch' not in sys.modules and 'megatron.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
