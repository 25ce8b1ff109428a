"""HuggingFace interop (issue 12, part 3; the RoPE options of part 4).

Tiny random ``transformers`` models (Llama with GQA, tied and untied, with linear and Llama-3
RoPE scaling; GPT-2) are saved locally, imported with ``tools/convert_hf.py`` /
``megatron_ext.hf``, and our GPT (built by the product's ``build_gpt`` and loaded by its
``Checkpointer``, fp32 on CPU) must give the ``transformers`` logits (max abs error <= 1e-4),
also imported and loaded under TP=2 in two processes. Export writes back every tensor bit for
bit, and ``AutoModelForCausalLM.from_pretrained`` loads the export.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from launch import free_port  # noqa: E402

from megatron_ext.hf.convert import export_hf, full_logits, import_hf, loaded_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-4


def convert_hf_cli():
    spec = importlib.util.spec_from_file_location("convert_hf", REPO / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb(model, seed=0):
    """Random norm weights and biases too, so a mixed-up mapping cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def llama(path, tied, **rope):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, **rope)
    model = perturb(transformers.LlamaForCausalLM(config))
    model.save_pretrained(path)
    return model


def gpt2(path, dtype=torch.float32):
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=VOCAB + 1, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    model = perturb(transformers.GPT2LMHeadModel(config))
    model.to(dtype).save_pretrained(path)
    return model


@torch.no_grad()
def hf_logits(model):
    return model(TOKENS).logits.float()


def our_logits(ckpt, args=()):
    with loaded_model(str(ckpt), args) as (_, gpt, _):
        return full_logits(gpt, TOKENS)


def assert_close(ours, theirs, tolerance=TOLERANCE):
    err = (ours[..., :theirs.shape[-1]] - theirs).abs().max().item()
    assert err <= tolerance, f"max abs error {err}"


def assert_bitwise_round_trip(hf_dir, out_dir):
    from safetensors.torch import load_file

    before = load_file(str(Path(hf_dir) / "model.safetensors"))
    after = load_file(str(Path(out_dir) / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    """A GQA Llama, untied, linear RoPE scaling x2 and rope_theta 500000, imported by the CLI."""
    root = tmp_path_factory.mktemp("llama")
    model = llama(root / "hf", tied=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "linear", "factor": 2.0})
    return root, model


def test_llama_gqa_untied_matches_transformers_and_round_trips(untied_llama, capsys):
    root, model = untied_llama
    cli = convert_hf_cli()
    assert cli.main(["import", "--hf-dir", str(root / "hf"), "--save", str(root / "ckpt")]) == 0
    printed = capsys.readouterr().out
    for flags in ("--num-query-groups 2", "--swiglu", "--normalization RMSNorm",
                  "--untie-embeddings-and-output-weights", "--rotary-base 500000",
                  "--rotary-seq-len-interpolation-factor 2.0", "--disable-bias-linear"):
        assert flags in printed, printed
    assert (root / "ckpt" / "iter_0000000" / "manifest.json").exists()
    assert_close(our_logits(root / "ckpt"), hf_logits(model))

    assert cli.main(["export", "--load", str(root / "ckpt"), "--hf-dir", str(root / "out")]) == 0
    assert_bitwise_round_trip(root / "hf", root / "out")
    config = json.loads((root / "out" / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(root / "out")).eval()
    assert torch.equal(hf_logits(exported), hf_logits(model))


def test_llama_tied_with_llama3_rope_scaling(tmp_path):
    model = llama(tmp_path / "hf", tied=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    path, flags = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert "--use-rope-scaling" in flags and "--untie-embeddings-and-output-weights" not in flags
    assert_close(our_logits(tmp_path / "ckpt"), hf_logits(model))
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert_bitwise_round_trip(tmp_path / "hf", tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(hf_logits(exported), hf_logits(model))


def test_gpt2_matches_transformers_and_round_trips_in_fp32_and_bf16(tmp_path):
    model = gpt2(tmp_path / "hf")
    _, flags = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert "--openai-gelu" in flags and "learned_absolute" in flags
    assert_close(our_logits(tmp_path / "ckpt"), hf_logits(model))
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert_bitwise_round_trip(tmp_path / "hf", tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(hf_logits(exported), hf_logits(model))

    gpt2(tmp_path / "hf16", dtype=torch.bfloat16)
    import_hf(str(tmp_path / "hf16"), str(tmp_path / "ckpt16"))
    export_hf(str(tmp_path / "ckpt16"), str(tmp_path / "out16"))  # bf16, as imported
    assert_bitwise_round_trip(tmp_path / "hf16", tmp_path / "out16")


def test_import_under_tp2_gives_the_same_logits(untied_llama, tmp_path):
    root, model = untied_llama
    if not (root / "ckpt").exists():
        import_hf(str(root / "hf"), str(root / "ckpt"))
    torch.save(TOKENS, tmp_path / "tokens.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = REPO / "tests" / "dist" / "hf_worker.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker),
         "--hf-dir", str(root / "hf"), "--ckpt", str(root / "ckpt"), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "HF_WORKER_OK" in proc.stdout, proc.stderr[-5000:]
    want = hf_logits(model)
    assert_close(torch.load(tmp_path / "tp2_import.pt"), want)  # converted by 2 ranks
    assert_close(torch.load(tmp_path / "tp1_import.pt"), want)  # TP=1 import, TP=2+SP load


def test_rope_flags_reach_megatron_core():
    from gpt_helpers import build, one_rank_megatron

    from megatron_ext.training.job import parse_job

    job = parse_job(["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
                     "--rotary-percent", "0.5", "--rotary-seq-len-interpolation-factor", "4",
                     "--use-rope-scaling", "--rope-scaling-factor", "16"], 1)
    with one_rank_megatron(job):
        rope = build(job, 257).gpt.rotary_pos_emb
    assert rope.inv_freq.numel() == 16 // 2 // 2  # half of the 16 channels of each head
    assert rope.seq_len_interpolation_factor == 4.0
    plain = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    # Llama 3 scaling: the highest frequency stays, the lowest one (wavelength 6283 > 2048)
    # moves towards plain / 16.
    assert rope.inv_freq[0] == plain[0] and rope.inv_freq[-1] < plain[-1] / 4


def test_unsupported_models_and_missing_extras_are_one_line(tmp_path, monkeypatch, capsys):
    from megatron_ext.hf import mapping
    from megatron_ext.hf.convert import require_hf
    from megatron_ext.training.config import ModelConfig

    yarn = {"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(mapping.Unsupported, match="'yarn' has no megatron-core"):
        mapping._rope_flags(yarn)
    with pytest.raises(mapping.Unsupported, match="model_type 'bert'"):
        mapping.model_flags({"model_type": "bert"})
    with pytest.raises(mapping.Unsupported, match="config.json has no 'intermediate_size', "):
        mapping.model_flags({"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
                             "num_attention_heads": 4, "num_hidden_layers": 2})
    with pytest.raises(mapping.Unsupported, match="config.json has no 'vocab_size'"):
        mapping.model_flags({"model_type": "gpt2"})
    from dataclasses import asdict
    partial = asdict(ModelConfig(swiglu=True, normalization="RMSNorm", rotary_percent=0.5))
    with pytest.raises(mapping.Unsupported, match="--rotary-percent"):
        mapping.hf_config(partial, 300)

    assert convert_hf_cli().main(["import", "--hf-dir", str(tmp_path), "--save",
                                  str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read config.json" in err[0], err
    (tmp_path / "config.json").write_text("[1, 2]")
    assert convert_hf_cli().main(["import", "--hf-dir", str(tmp_path), "--save",
                                  str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is not a JSON object" in err[0], err
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(mapping.Unsupported, match=r"pip install 'megatron_ext\[hf\]'"):
        require_hf()
