"""GNS layers in one process: norm layer and linear autograd function vs brute force.

(The per-sample norm-parameter kernel itself is tested in test_kernel_norm_param_sample_norm.)
"""
import subprocess
import sys

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.gns import layers as gl
from megatron_ext.kernels import LinearWithSampleNorms, wgrad_sample_norms_reference
from megatron_ext.model.norms import SPNorm

from gns_helpers import run_python_check

S, B, H = 6, 3, 16


class FakeTracker:
    """Records what layers report; micro-batch 0 always."""

    def __init__(self):
        self.sq = torch.zeros(B, dtype=torch.float64)

    def microbatch_index(self, module):
        return 0 if torch.is_grad_enabled() else None

    def add_sq_norms(self, mb, sq, tp_duplicated=False):
        self.sq += sq.double()

    def add_grad_vectors(self, mb, vec):
        self.sq += vec.double().square().sum(-1)


def _cfg(normalization, zero_centered=False):
    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2,
                             normalization=normalization,
                             layernorm_zero_centered_gamma=zero_centered)


@pytest.mark.parametrize("normalization,zc", [("LayerNorm", False), ("LayerNorm", True),
                                              ("RMSNorm", False)])
def test_gns_norm_matches_spnorm_and_brute_force(normalization, zc):
    torch.manual_seed(0)
    cfg = _cfg(normalization, zc)
    tracker = FakeTracker()
    ref, gns = SPNorm(cfg, H), gl.GNSNorm(cfg, H, recorder=tracker)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    gns.load_state_dict(ref.state_dict())
    x = torch.randn(S, B, H, dtype=torch.float64).float()
    w = torch.randn(S, B, H)  # fixed random cotangent: loss = sum(out * w)
    xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_g = ref(xr), gns(xg)
    torch.testing.assert_close(out_g, out_r)
    (out_r * w).sum().backward()
    (out_g * w).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for pg, pr in zip(gns.parameters(), ref.parameters()):
        torch.testing.assert_close(pg.grad, pr.grad, rtol=1e-5, atol=1e-6)
    # brute force: one backward per sample on the reference module
    brute = []
    for i in range(B):
        ref.zero_grad()
        (ref(x[:, i:i + 1]) * w[:, i:i + 1]).sum().backward()
        brute.append(sum(float(p.grad.double().square().sum()) for p in ref.parameters()))
    torch.testing.assert_close(tracker.sq, torch.tensor(brute, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_function_gradient_accumulation_fusion(bias):
    torch.manual_seed(1)
    x = torch.randn(S, B, H, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, H))
    b = torch.nn.Parameter(torch.randn(8)) if bias else None
    weight.main_grad = torch.ones(8, H)  # fp32 main grad already holding earlier micro-batches
    weight.grad_added_to_main_grad = False
    got = []
    y = LinearWithSampleNorms.apply(x, weight, b, got.append, "sbh", True)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = wgrad_sample_norms_reference(x.detach(), dy, "sbh", compute_bias=bias)
    torch.testing.assert_close(weight.main_grad, 1 + ref.grad_weight, rtol=1e-5, atol=1e-5)
    assert weight.grad_added_to_main_grad is True  # Megatron's DDP hook then skips .grad
    expected = ref.sq_norms_weight + (ref.sq_norms_bias if bias else 0)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, dy @ weight.detach())
    if bias:
        torch.testing.assert_close(b.grad, dy.sum((0, 1)))


def test_gns_package_stays_import_light():
    code = ("import sys, megatron_ext.gns as g; assert 'torch' not in sys.modules; "
            "assert 'GNSTracker' in g.__all__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_BUILD_CHECK = """
import torch
from megatron_ext.gns import embedding as ge, layers as gl
from megatron_ext.gns.component import GNSComponent
from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec
from megatron_ext.training.hooks import ModelOptions
from megatron_ext.training.initialize import initialize_megatron, set_seeds
from megatron_ext.training.job import parse_job
from megatron_ext.training.model import build_gpt, build_transformer_config

GPT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
       "--seq-length", "8", "--qk-layernorm", "--make-vocab-size-divisible-by", "64",
       "--seed", "7"]
job = parse_job(GPT + ["--gns", "--gns-include-embedding"], world_size=1)
initialize_megatron(job)  # a world of one (gloo, CPU backend), parallel state
gns_component = GNSComponent(job.gns)
# Its tracker measures nothing before begin_step: the layers must stay megatron's own path.
rec = gns_component.tracker
options = gns_component.model_options()  # --gns --gns-include-embedding
assert options.model_class is ge.GNSGPTModel and options.model_kwargs == {"gns_recorder": rec}
layers_only = ModelOptions(layer_specs=options.layer_specs)  # --gns alone: plain GPTModel

def build(opts):
    set_seeds(job.training.seed)
    built = build_gpt(job, 64, opts)
    return built.gpt, torch.rand(4)  # the RNG stream after building

plain, rng_plain = build(layers_only)
gns, rng_gns = build(options)
assert type(plain).__name__ == "GPTModel" and type(gns) is ge.GNSGPTModel
assert torch.equal(rng_plain, rng_gns), "building the GNS embedding moved the RNG"
sd_plain, sd_gns = plain.state_dict(), gns.state_dict()
assert sd_plain.keys() == sd_gns.keys()
assert all(torch.equal(sd_plain[k], sd_gns[k]) for k in sd_plain if torch.is_tensor(sd_plain[k]))
# every spec slot was built with its recorder (linear_qkv is called, the others built)
slots = {}
for name, m in gns.named_modules():
    if getattr(m, "gns_recorder", None) is rec:
        slots[name.rsplit(".", 1)[-1]] = slots.get(name.rsplit(".", 1)[-1], 0) + 1
want = {s: 2 for s in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "input_layernorm",
                       "pre_mlp_layernorm", "q_layernorm", "k_layernorm")}
want.update(final_layernorm=1, word_embeddings=1, output_layer=1)
assert slots == want, slots
emb = gns.embedding.word_embeddings
assert type(emb) is ge.GNSVocabParallelEmbedding and type(gns.output_layer) is ge.GNSOutputLayer
assert type(gns.embedding) is ge.GNSLanguageModelEmbedding
assert gns.output_layer.weight is None and gns.shared_embedding_or_output_weight() is emb.weight
assert emb.weight.is_embedding_or_output_parameter and emb.weight.zero_out_wgrad
assert {id(p) for p in gl.tracked_parameters([gns], rec)} == {id(p) for p in gns.parameters()}
assert len(gl.tracked_parameters([plain], rec)) == len(list(plain.parameters())) - 1
tokens = torch.randint(0, 64, (2, 8))
pos = torch.arange(8).expand(2, -1)
assert torch.equal(plain(tokens, pos, None), gns(tokens, pos, None))  # inert: same logits

# Layouts whose embedding norms are not exact: the job refuses the flags, and GNSGPTModel
# (for direct library use) refuses the layout itself.
pp_job = parse_job(GPT + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"],
                   world_size=2)  # tied weights split over two stages
cfg = build_transformer_config(job)
for why, flags, kw in (
        ("learned absolute", ["--position-embedding-type", "learned_absolute"],
         dict(config=cfg, position_embedding_type="learned_absolute")),
        ("PP=1", ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"],
         dict(config=build_transformer_config(pp_job), position_embedding_type="rope"))):
    try:
        parse_job(GPT + flags + ["--gns", "--gns-include-embedding"], world_size=2)
        raise AssertionError(f"parse_job accepted {flags}")
    except ValueError as e:
        assert "--gns-include-embedding" in str(e), e
    spec = get_gpt_block_spec(kw["config"], get_gpt_layer_spec(**options.layer_specs),
                              norm=options.layer_specs["norm"])
    try:
        ge.GNSGPTModel(transformer_layer_spec=spec, vocab_size=64, max_sequence_length=8,
                       share_embeddings_and_output_weights=True, gns_recorder=rec, **kw)
        raise AssertionError(f"GNSGPTModel built {flags}")
    except ValueError as e:
        assert why in str(e), e
print("BUILD_OK")
"""


def test_layer_specs_and_gns_gpt_model_build():
    # A fresh process: megatron-core needs its parallel state (1 rank, gloo, CPU backend),
    # set up by training's initialize_megatron; the GPTs come from training's build_gpt.
    run_python_check(_BUILD_CHECK, "BUILD_OK")
