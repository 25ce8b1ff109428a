"""FlashCoreAttention (sdpa) vs megatron-core's DotProductAttention, single process.

Two levels: one bare core-attention module of each kind on the same q/k/v (the modules
themselves, with TransformerConfig options that no training flag sets), and the tiny GPT
that training builds with ``--attention-backend local`` vs ``sdpa`` (``parse_job`` ->
``build_gpt`` -> schedule + optimizer steps). Runs on CPU through the CPU backend; on a CUDA
machine the same checks run on the GPU.
"""

import importlib.util

import pytest
import torch

from megatron_ext.cpu_backend import enable_cpu_backend

enable_cpu_backend()  # a no-op with CUDA: then the tensors below live on the GPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 1e-4 if DEVICE.type == "cuda" else 1e-5  # fused fp32 kernels vs baddbmm on GPU

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_ext.model.attention import (  # noqa: E402
    FlashCoreAttention,
    SDPACoreAttention,
    get_core_attention,
)
from megatron_ext.model.attention_config import AttentionConfig  # noqa: E402
from megatron_ext.training.initialize import set_seeds  # noqa: E402
from megatron_ext.training.job import parse_job  # noqa: E402
from megatron_ext.training.model import build_optimizer  # noqa: E402

from gpt_helpers import (  # noqa: E402
    build, forward_backward, mean_loss, micro_batches, one_rank_megatron)

# The tiny GPT of the model-level checks: 2 layers, 4 heads of 16, 24 tokens, 2 samples.
TINY_GPT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "24", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--seed", "0", "--optimizer", "sgd", "--lr", "0.1"]
VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """A world of one with megatron's parallel state, set up as training does."""
    with one_rank_megatron(parse_job(TINY_GPT, world_size=1)):
        yield


def _config(heads=4, groups=None, dtype=torch.float32, **kw):
    return TransformerConfig(
        num_layers=2, hidden_size=16 * heads, num_attention_heads=heads, num_query_groups=groups,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, **kw,
    )


def _qkv(s, b, heads, groups, hn, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, hn, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(s, b, groups, hn, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(s, b, groups, hn, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def _run(module, q, k, v, mask_type=AttnMaskType.causal):
    out = module(q, k, v, None, attn_mask_type=mask_type)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("seq", [13, 32])
def test_matches_dot_product_attention(groups, dtype, tol, seq):
    cfg = _config(heads=4, groups=groups, dtype=dtype)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    ref_mod, our_mod = DotProductAttention(**args), SDPACoreAttention(**args)
    q, k, v = _qkv(seq, 2, 4, groups, 16, dtype)
    ref = _run(ref_mod, q, k, v)
    ours = _run(our_mod, q, k, v)
    assert ours[0].shape == (seq, 2, 64) and ours[0].dtype == dtype
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_no_mask():
    cfg = _config(groups=2)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                attention_type="self")
    q, k, v = _qkv(11, 2, 4, 2, 16, torch.float32)
    nm = AttnMaskType.no_mask
    ref = _run(DotProductAttention(**args), q, k, v, nm)
    ours = _run(SDPACoreAttention(**args), q, k, v, nm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)


def test_query_key_layer_scaling_and_explicit_scale():
    cfg = _config(fp16=False, apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True)
    args = dict(config=cfg, layer_number=3, attn_mask_type=AttnMaskType.causal,
                attention_type="self", softmax_scale=0.1)
    q, k, v = _qkv(9, 1, 4, 4, 16, torch.float32)
    ref, ours = _run(DotProductAttention(**args), q, k, v), _run(SDPACoreAttention(**args), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)


def test_dropout_reproducible_under_rng_tracker():
    cfg = _config()
    mod = SDPACoreAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                            attention_type="self", attention_dropout=0.5)
    q, k, v = _qkv(8, 1, 4, 4, 16, torch.float32)
    outs = []
    for _ in range(2):
        model_parallel_cuda_manual_seed(99)
        default_state = torch.get_rng_state()
        outs.append(mod(q, k, v, None))
        # the dropout mask came from the tracker's stream, not the default generator
        assert torch.equal(torch.get_rng_state(), default_state)
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], mod.eval()(q, k, v, None))
    with tensor_parallel.get_cuda_rng_tracker().fork():
        pass  # tracker still usable


def test_backend_selection_and_description():
    cls, desc = get_core_attention(AttentionConfig(attention_backend="local"))
    assert cls is DotProductAttention and desc.startswith("local")
    cls, desc = get_core_attention(AttentionConfig(attention_backend="sdpa"))
    assert cls is SDPACoreAttention and "scaled_dot_product_attention" in desc
    cls, desc = get_core_attention(AttentionConfig(attention_backend="auto",
                                                   context_parallel_size=2))
    assert issubclass(cls, FlashCoreAttention) and "ring attention over CP=2" in desc
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn"):
            get_core_attention(AttentionConfig(attention_backend="flash"))
    with pytest.raises(ValueError, match="causal and no_mask"):
        SDPACoreAttention(config=_config(), layer_number=1, attn_mask_type=AttnMaskType.padding,
                          attention_type="self")


def _gpt_loss(backend, recompute=None, steps=2, attention_dropout=0.0):
    """Losses of training's tiny GPT with ``--attention-backend backend`` over ``steps``
    optimizer steps (SGD), and core-attention calls per step."""
    flags = TINY_GPT + ["--attention-backend", backend,
                        "--attention-dropout", str(attention_dropout)]
    if recompute:
        flags += ["--recompute-granularity", recompute]
    job = parse_job(flags, world_size=1)
    set_seeds(job.training.seed)  # the same dropout stream for every build
    built = build(job, VOCAB)
    want = {"local": DotProductAttention, "sdpa": SDPACoreAttention}[backend]
    assert all(type(layer.self_attention.core_attention) is want
               for layer in built.gpt.decoder.layers)
    calls = []
    for layer in built.gpt.decoder.layers:
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda *a: calls.append(1)
        )
    optimizer = build_optimizer(job, built.config, built.ddp)
    tokens = torch.randint(0, VOCAB, (2, 25), generator=torch.Generator().manual_seed(1))
    batches = micro_batches(tokens, 2, device=DEVICE)
    losses = []
    for _ in range(steps):
        built.ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(mean_loss(forward_backward(built.ddp, batches)))
        optimizer.step()
    return losses, len(calls) // steps


@pytest.mark.parametrize("recompute", [None, "selective"])
def test_gpt_loss_local_vs_sdpa(recompute):
    ref, ref_calls = _gpt_loss("local", recompute)
    ours, calls = _gpt_loss("sdpa", recompute)
    assert ours == pytest.approx(ref, rel=FP32_TOL)
    # selective recompute runs core attention again in backward (_checkpointed_attention_forward)
    assert calls == ref_calls == (4 if recompute else 2)


def test_selective_recompute_replays_dropout():
    plain, _ = _gpt_loss("sdpa", None, attention_dropout=0.3)
    recomputed, _ = _gpt_loss("sdpa", "selective", attention_dropout=0.3)
    no_dropout, _ = _gpt_loss("sdpa", None)
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert plain[1] != pytest.approx(no_dropout[1], rel=1e-6)
