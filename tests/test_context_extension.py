"""The README recipe "Extend a pretrained model from 4k to 32k", at tiny sizes (issue 12, part 4).

A tiny random Llama trained for 32 positions is imported (``tools/convert_hf.py import``),
trained for 3 steps by ``examples/pretrain_gpt.py`` in 2 processes at twice the sequence
length with linear position interpolation, context parallelism and selective recompute
(starting as a finetune: iteration 0, a new optimizer), and exported. ``transformers`` loads
the export, and its logits equal our GPT's of the extended checkpoint (max abs error <= 1e-4,
fp32), at positions beyond the original context.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from launch import losses, run_pretrain  # noqa: E402

from megatron_ext.hf.convert import export_hf, full_logits, import_hf, loaded_model  # noqa: E402

SHORT, LONG = 32, 64


def test_extend_a_pretrained_llama_to_twice_its_context(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SHORT,
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    _, flags = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))

    extension = ["--seq-length", str(LONG), "--max-position-embeddings", str(LONG),
                 "--rotary-seq-len-interpolation-factor", str(LONG // SHORT),
                 "--context-parallel-size", "2", "--recompute-granularity", "selective"]
    proc = run_pretrain(2, [*flags, "--load", str(tmp_path / "imported"),
                            "--save", str(tmp_path / "extended"), *extension,
                            "--micro-batch-size", "1", "--global-batch-size", "2",
                            "--train-iters", "3", "--lr", "1e-4", "--lr-decay-style", "constant",
                            "--eval-iters", "0", "--data-cache-path", str(tmp_path / "dc"),
                            "--default-corpus-mb", "0.25",
                            "--log-json", str(tmp_path / "log.jsonl")], tmp_path)
    assert "took only the model weights" in proc.stdout, proc.stdout[-3000:]
    assert sorted(losses(tmp_path / "log.jsonl")) == [1, 2, 3]  # a finetune from iteration 0

    export_hf(str(tmp_path / "extended"), str(tmp_path / "out"))  # flags saved in the checkpoint
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = exported.get("rope_parameters") or exported["rope_scaling"]
    assert exported["max_position_embeddings"] == LONG and exported["vocab_size"] == 320
    assert rope["rope_type"] == "linear" and rope["factor"] == LONG // SHORT

    tokens = torch.randint(0, 320, (2, LONG), generator=torch.Generator().manual_seed(1))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        theirs = model(tokens).logits
    with loaded_model(str(tmp_path / "extended")) as (_, gpt, loop):
        assert loop["train_state"]["iteration"] == 3
        ours = full_logits(gpt, tokens)[..., :320]
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4, f"max abs error {err}"
    original = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert not torch.equal(original.lm_head.weight, model.lm_head.weight)  # it was trained
