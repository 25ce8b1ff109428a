"""Data fixtures shared by test modules: ``write_pretokenized``, ``train_tokenizers`` (small
tokenizers trained on stdlib sources), ``tokenizer_flags``, ``write_tiktoken_json``."""
import numpy


def write_pretokenized(prefix, docs, dtype=numpy.uint16):
    """A Megatron indexed dataset of given id lists, written by megatron-core's own builder
    (what Megatron-LM's preprocess_data.py produces with any tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(numpy.asarray(doc, dtype=numpy.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def write_tiktoken_json(path, merges=(b"  ", b"    ", b"de", b"def", b"re", b"ret", b"return",
                                      b"th", b"the", b"in")):
    """A tiny tiktoken vocabulary in Megatron-LM's JSON format: the 256 bytes, then ``merges``."""
    import base64
    import json

    tokens = [bytes([i]) for i in range(256)] + list(merges)
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"rank": i, "token_bytes": base64.b64encode(t).decode("ascii"),
                    "token_str": t.decode("utf-8", errors="replace")}
                   for i, t in enumerate(tokens)], f)
    return str(path)


def train_tokenizers(root, files=8, bpe_vocab=600, sp_vocab=400):
    """Tokenizers trained here on the first ``files`` stdlib sources (a few seconds):
    {"hf_dir", "tokenizer_json", "vocab_file", "merge_file", "sp_model", "tiktoken_json"}."""
    from megatron_ext.data.tokenizer_training import (stdlib_sources, train_byte_level_bpe,
                                                      train_sentencepiece)

    sources = stdlib_sources(2_000_000)[:files]
    paths = train_byte_level_bpe(sources, str(root / "bpe"), bpe_vocab)
    paths["sp_model"] = train_sentencepiece(sources, str(root / "sp"), sp_vocab)
    paths["tiktoken_json"] = write_tiktoken_json(root / "tiktoken.json")
    return paths


def tokenizer_flags(kind, paths):
    """The --tokenizer-* flags of ``kind`` for the files of :func:`train_tokenizers`."""
    return {
        "GPT2BPETokenizer": ["--vocab-file", paths["vocab_file"], "--merge-file",
                             paths["merge_file"]],
        "HuggingFaceTokenizer": ["--tokenizer-model", paths["hf_dir"]],
        "SentencePieceTokenizer": ["--tokenizer-model", paths["sp_model"]],
        "TikTokenizer": ["--tokenizer-model", paths["tiktoken_json"]],
    }[kind] + ["--tokenizer-type", kind]
