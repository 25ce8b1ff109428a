"""Tokenizers: ``ByteTokenizer`` (ids 0..255 are the UTF-8 bytes, 256 is end-of-document) and
``NullTokenizer`` (already tokenized data, e.g. Megatron-LM datasets made with a BPE tokenizer).

Main API: :func:`build_tokenizer`.

Why bytes: the default corpus and the tests must work with no download, and a byte vocabulary
needs no merge table or model file. The class is duck-typed to what megatron-core's
``GPTDataset``/``MegatronDataset`` read from ``config.tokenizer`` (``vocab_size``, ``eod``,
``unique_identifiers``), the same way megatron's own ``NullTokenizer`` does, so importing it
does not import Megatron.

There is deliberately no ``pad`` id: ``MegatronDataset`` then pads with -1, which it maps to
token 0 with loss mask 0, so padding can never collide with a real byte or with ``eod``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import numpy

BYTE_TOKENIZER_TYPES = ("byte",)
"""Tokenizers that turn text into ids (what tools/preprocess_data.py can use)."""
TOKENIZER_TYPES = ("byte", "NullTokenizer")
"""Values accepted by ``--tokenizer-type``."""


class _MegatronTokenizer:
    """What megatron-core's datasets read besides ``vocab_size`` and ``eod`` (subclasses)."""

    @property
    def eos(self) -> int:
        """Alias of ``eod`` (megatron checks both for pad collisions)."""
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identifies the tokenizer in megatron's dataset cache hashes (must be JSON-able)."""
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("vocab_size", self.vocab_size)]
        )


class ByteTokenizer(_MegatronTokenizer):
    """UTF-8 byte tokenizer with one special token, ``eod`` = 256; ``vocab_size`` = 257.

    The model pads the embedding to a multiple of its own choosing; ids >= 257 that a model may
    sample are dropped by :meth:`detokenize`.
    """

    num_bytes = 256
    eod = 256
    """End-of-document id, appended after every document by the preprocessors."""

    @property
    def vocab_size(self) -> int:
        """256 byte ids + ``eod``."""
        return self.num_bytes + 1

    @property
    def vocab(self) -> dict:
        """Token text -> id; bytes are shown as latin-1 characters."""
        table = {bytes([i]).decode("latin-1"): i for i in range(self.num_bytes)}
        table["<eod>"] = self.eod
        return table

    @property
    def inv_vocab(self) -> dict:
        """Id -> token text (inverse of :attr:`vocab`)."""
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        """UTF-8 encode ``text``; one id per byte, no special tokens added."""
        return list(text.encode("utf-8"))

    def tokenize_bytes(self, data: bytes) -> numpy.ndarray:
        """Raw bytes -> ids as a uint16 array (fast path for files; no decoding needed)."""
        return numpy.frombuffer(data, dtype=numpy.uint8).astype(numpy.uint16)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids -> text; non-byte ids (``eod``, model padding) are dropped and invalid UTF-8 is
        replaced by U+FFFD, so any model output can be printed."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.num_bytes)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class NullTokenizer(_MegatronTokenizer):
    """Ids given by the data (pre-tokenized Megatron datasets); as Megatron-LM's
    ``NullTokenizer``: ids < ``vocab_size`` are the data's, ``eod`` = ``vocab_size`` is one
    extra id, so the model's vocabulary is ``vocab_size + 1``. Text in/out is ids as decimal
    numbers separated by spaces."""

    def __init__(self, vocab_size: int):
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive integer, got {vocab_size!r}")
        self.data_vocab_size = vocab_size
        self.eod = vocab_size

    @property
    def vocab_size(self) -> int:
        """Data ids + ``eod``."""
        return self.data_vocab_size + 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(tokenizer_type: str = "byte", vocab_size: Optional[int] = None):
    """Return the tokenizer named by ``--tokenizer-type`` (``vocab_size``: NullTokenizer's)."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (the data's "
                             "ids are < N; e.g. 50257 for GPT-2 BPE)")
        return NullTokenizer(vocab_size)
    if tokenizer_type not in BYTE_TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of "
            f"{list(TOKENIZER_TYPES)} (byte: preprocess text with tools/preprocess_data.py; "
            "NullTokenizer: data already tokenized, with --vocab-size)"
        )
    if vocab_size is not None:
        raise ValueError("--vocab-size is for --tokenizer-type NullTokenizer (the byte "
                         "tokenizer's vocabulary is fixed at 257)")
    return ByteTokenizer()
