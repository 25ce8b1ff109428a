"""Megatron-LM checkpoint compatibility and finetune loading (issue 12, part 5).

A GPT built from megatron-core's own local layer spec and saved with ``dist_checkpointing``
the way Megatron-LM saves a model (``iter_N`` with the model's sharded state dict, no loop
state) loads into megatron_ext's GPT through the ``Checkpointer`` with finetune semantics and
gives the same logits (and, with its model flags, exports to transformers); both models have
the same sharded keys. ``--finetune`` loads only the weights of a full checkpoint, a restarted
finetune run resumes its own checkpoint, and a checkpoint written before our layer spec
mapped the norm keys still loads.
"""
import os

import pytest
import torch
from gpt_helpers import build, one_rank_megatron

from megatron_ext.training.job import parse_job

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seq-length", "16"]
VOCAB = 257  # padded to 384


class Lines:
    """The Checkpointer's log: keeps what it announces."""

    def __init__(self):
        self.lines = []

    def announce(self, line):
        self.lines.append(line)


def sharded_keys(model):
    return sorted(getattr(v, "key", "") for v in model.sharded_state_dict().values())


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def checkpointer_for(job, padded, log):
    from megatron_ext.training import checkpointing
    from megatron_ext.training.checkpointer import Checkpointer

    ckpt = Checkpointer(job.checkpoint, log)
    ckpt.signature = checkpointing.model_signature(job.model, padded)
    return ckpt, ckpt.prepare()


def new_state(job):
    from megatron_ext.training.state import TrainState

    return TrainState(job.model.seq_length, 2, 2, 1)


def save_like_megatron_lm(model, root, iteration):
    """What Megatron-LM's save_checkpoint writes for a model-only save (dist_checkpointing)."""
    from megatron.core import dist_checkpointing

    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": iteration,
                             "checkpoint_version": 3.0}, str(path))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_megatron_core_local_spec_checkpoint_loads_with_the_same_logits(tmp_path):
    from types import SimpleNamespace

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.hf.convert import export_hf, full_logits

    root = tmp_path / "megatron_lm"
    job = parse_job(FLAGS + ["--load", str(root)], 1)
    with one_rank_megatron(job):
        ours = build(job, VOCAB)
        padded = ours.gpt.embedding.word_embeddings.weight.shape[0]
        theirs = GPTModel(ours.config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                          vocab_size=padded, max_sequence_length=16,
                          share_embeddings_and_output_weights=False,
                          position_embedding_type="rope")
        assert sharded_keys(ours.gpt) == sharded_keys(theirs)
        randomize(theirs, seed=3)
        save_like_megatron_lm(theirs, root, 5)

        log, state = Lines(), new_state(job)
        ckpt, path = checkpointer_for(job, padded, log)
        assert path.endswith("iter_0000005") and "model-only" in ckpt.finetune
        ckpt.resume(path, state, SimpleNamespace(gpt=ours.gpt), keep_batch=True)
        assert state.iteration == 0 and state.consumed_samples == 0
        assert any("took only the model weights" in line for line in log.lines), log.lines

        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        want = full_logits(theirs, tokens)
        got = full_logits(ours.gpt, tokens)
        assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()

    # ... and, given its model flags, it exports to a model transformers loads.
    transformers = pytest.importorskip("transformers")
    export_hf(str(root), str(tmp_path / "hf"), FLAGS)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        exported = model(tokens).logits
    assert (exported - want).abs().max() <= 1e-4, (exported - want).abs().max()


def test_finetune_loads_only_the_weights_and_a_restart_resumes_its_own_checkpoint(tmp_path):
    from types import SimpleNamespace

    from megatron_ext.training import checkpointing
    from megatron_ext.training.checkpoint_dir import CheckpointDir

    pretrained, finetuned = tmp_path / "pretrained", tmp_path / "finetuned"
    job = parse_job(FLAGS + ["--load", str(pretrained), "--finetune", "--save", str(finetuned)], 1)
    with one_rank_megatron(job):
        source, target = build(job, VOCAB), build(job, VOCAB)
        randomize(source.gpt, seed=5)
        padded = source.gpt.embedding.word_embeddings.weight.shape[0]
        loop = {"format_version": checkpointing.FORMAT_VERSION,
                "train_state": {"iteration": 7, "consumed_samples": 14, "global_batch_size": 2,
                                "micro_batch_size": 2},
                "model": checkpointing.model_signature(job.model, padded)}
        checkpointing.save_checkpoint(CheckpointDir(str(pretrained)), 7, source.gpt, None, loop,
                                      save_optim=False)
        log, state = Lines(), new_state(job)
        ckpt, path = checkpointer_for(job, padded, log)
        assert ckpt.finetune == "--finetune"
        ckpt.resume(path, state, SimpleNamespace(gpt=target.gpt), keep_batch=True)
        assert state.iteration == 0
        for (name, a), b in zip(source.gpt.named_parameters(), target.gpt.parameters()):
            assert torch.equal(a, b), name

        # The run saved into --save and was restarted: its own checkpoint wins over --load.
        os.close(ckpt.dir._lock_fd)  # the first attempt ended (its lock with it)
        checkpointing.save_checkpoint(CheckpointDir(str(finetuned)), 3, target.gpt, None,
                                      {**loop, "train_state": {**loop["train_state"],
                                                               "iteration": 3}}, save_optim=False)
        log = Lines()
        ckpt, path = checkpointer_for(job, padded, log)
        assert path.endswith("finetuned/iter_0000003") and ckpt.finetune is None
        assert any("this finetune run" in line for line in log.lines), log.lines


def test_checkpoint_without_the_norm_keys_map_still_loads(tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_ext.model.layer_spec import unfused_norm_key
    from megatron_ext.training import checkpointing

    job = parse_job(FLAGS, 1)
    with one_rank_megatron(job):
        source, target = build(job, VOCAB), build(job, VOCAB)
        randomize(source.gpt, seed=9)
        state = source.gpt.sharded_state_dict()
        for sharded in state.values():  # the keys megatron_ext wrote before the keys map
            sharded.key = unfused_norm_key(sharded.key)
        assert "decoder.layers.input_layernorm.weight" in [s.key for s in state.values()]
        (tmp_path / "old").mkdir()
        dist_checkpointing.save({"model": state}, str(tmp_path / "old"))
        loop = checkpointing.load_model(str(tmp_path / "old"), target.gpt)
        assert checkpointing.is_model_only(loop)
        for (name, a), b in zip(source.gpt.named_parameters(), target.gpt.parameters()):
            assert torch.equal(a, b), name
