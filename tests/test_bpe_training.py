"""End to end with real tokenizers, nothing downloaded: train a small byte-level BPE (saved as a
HuggingFace tokenizer directory and as GPT-2 vocab.json/merges.txt) and a SentencePiece model
on a few stdlib files, preprocess a few others with ``--workers 2``, and train a tiny GPT on
each for a few steps: the run exits 0 and its first loss is near ln(vocabulary).
"""
import math

import pytest

from launch import TINY, losses, run_pretrain

from data_helpers import tokenizer_flags, train_tokenizers

from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.tokenizer_training import stdlib_sources

# (type, vocabulary, padded to a multiple of 256 by TINY's --make-vocab-size-divisible-by)
CASES = [("HuggingFaceTokenizer", 600, 768), ("GPT2BPETokenizer", 600, 768),
         ("SentencePieceTokenizer", 400, 512)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return train_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.mark.parametrize("kind,vocab,padded", CASES)
def test_train_on_locally_tokenized_text(tmp_path, tokenizers, capsys, kind, vocab, padded):
    flags = tokenizer_flags(kind, tokenizers)
    sources = stdlib_sources(600_000)[8:40]  # not the files the tokenizers were trained on
    prefix = str(tmp_path / "corpus")
    assert preprocess_main(["--input", *sources, "--output-prefix", prefix, "--workers", "2",
                            *flags]) == 0
    assert f"wrote {len(sources)} documents" in capsys.readouterr().out
    out = tmp_path / "metrics.jsonl"
    proc = run_pretrain(1, [*TINY, "--train-iters", "3", "--data-path", prefix, *flags,
                            "--data-cache-path", str(tmp_path / "cache"), "--log-json",
                            str(out)], tmp_path)
    assert f"{kind}(" in proc.stdout and f"vocab {vocab} padded to {padded}" in proc.stdout
    loss = losses(out)
    assert sorted(loss) == [1, 2, 3]
    assert abs(loss[1] - math.log(vocab)) < 0.5  # starts near uniform over the vocabulary
