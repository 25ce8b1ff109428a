"""Small tokenizers trained on local text, for trying the real-tokenizer path with no download
(the benchmark and tests use them): :func:`train_byte_level_bpe` (a HuggingFace tokenizer
directory plus GPT-2 ``vocab.json``/``merges.txt``), :func:`train_sentencepiece` (a ``.model``)
and :func:`stdlib_sources` (the default corpus's files, as paths).

Training is the libraries' own (``tokenizers``' byte-level BPE trainer, SentencePiece's
trainer); ``<|endoftext|>`` (BPE) and ``</s>`` (SentencePiece) are the end-of-document tokens.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Dict, Iterator, List, Sequence

from megatron_ext.data.default_corpus import list_stdlib_sources

BPE_EOD = "<|endoftext|>"


def stdlib_sources(max_bytes: int) -> List[str]:
    """Absolute paths of the stdlib ``*.py`` files of the default corpus (sorted, <= max_bytes)."""
    root = sysconfig.get_paths()["stdlib"]
    return [os.path.join(root, rel) for rel, _ in list_stdlib_sources(max_bytes)]


def train_byte_level_bpe(files: Sequence[str], out_dir: str, vocab_size: int = 2000
                         ) -> Dict[str, str]:
    """Train a GPT-2 style byte-level BPE on ``files``; write it to ``out_dir`` twice: as a
    HuggingFace tokenizer directory (``hf/``: tokenizer.json + tokenizer_config.json naming
    the eos token) and as GPT-2's ``vocab.json`` + ``merges.txt``.

    Returns ``{"hf_dir", "tokenizer_json", "vocab_file", "merge_file"}``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(list(files), vocab_size=vocab_size, min_frequency=2, special_tokens=[BPE_EOD],
              show_progress=False)
    hf_dir = os.path.join(out_dir, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    vocab_file, merge_file = bpe.save_model(out_dir)
    raw = os.path.join(out_dir, "tokenizer.json")
    bpe.save(raw)
    PreTrainedTokenizerFast(tokenizer_file=raw, eos_token=BPE_EOD).save_pretrained(hf_dir)
    return {"hf_dir": hf_dir, "tokenizer_json": raw, "vocab_file": vocab_file,
            "merge_file": merge_file}


def train_sentencepiece(files: Sequence[str], model_prefix: str, vocab_size: int = 1000) -> str:
    """Train a SentencePiece BPE model on the lines of ``files`` (whitespace kept as is, byte
    fallback on, so code round-trips); returns the ``.model`` path."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(files), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return model_prefix + ".model"


def _lines(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
