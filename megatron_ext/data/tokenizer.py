"""Tokenizers by ``--tokenizer-type``: our ``byte`` tokenizer (the default), Megatron-LM's
``GPT2BPETokenizer``, ``HuggingFaceTokenizer``, ``SentencePieceTokenizer``, ``TikTokenizer``
(:mod:`megatron_ext.data.text_tokenizers`) and ``NullTokenizer`` (already tokenized data).

Main API: :func:`build_tokenizer` (from a :class:`~megatron_ext.data.builder.DataConfig`, the
preprocessing flags or a :class:`TokenizerArgs`) and :func:`check_tokenizer_args` (the flag
checks alone, before any file is read).

Every tokenizer has what megatron-core's ``GPTDataset``/``MegatronDataset`` read from
``config.tokenizer`` (``vocab_size``, ``eod``, ``unique_identifiers``) plus ``tokenize(text)``
and ``detokenize(ids)``. Why bytes by default: the default corpus and the tests must work with
no download, and a byte vocabulary needs no merge table or model file. Importing this module
imports no Megatron and no tokenizer library.

There is deliberately no ``pad`` id: ``MegatronDataset`` then pads with -1, which it maps to
token 0 with loss mask 0, so padding can never collide with a real token or with ``eod``.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import numpy

TEXT_TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                        "TikTokenizer")
"""Megatron-LM's tokenizers of real text (they read a tokenizer file; no download)."""
TOKENIZER_TYPES = ("byte",) + TEXT_TOKENIZER_TYPES + ("NullTokenizer",)
"""Values accepted by ``--tokenizer-type``."""
TIKTOKEN_PATTERNS = ("v1", "v2")
"""Megatron-LM's tiktoken pre-tokenisation regexes (``--tiktoken-pattern``)."""

_MODEL = {"HuggingFaceTokenizer": "a local tokenizer directory or tokenizer.json",
          "SentencePieceTokenizer": "a local SentencePiece .model file",
          "TikTokenizer": "a local tiktoken vocabulary JSON (Megatron-LM's format)"}
"""What ``--tokenizer-model`` must name, per type (the rest take no model file)."""
_NEEDS = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "NullTokenizer": ("vocab_size",),
          **{kind: ("tokenizer_model",) for kind in _MODEL}}
"""The flags (fields) each type requires; the other file flags and ``--vocab-size`` must be
unset, except TikTokenizer's optional ``--vocab-size``."""
TIKTOKEN_MIN_SPECIAL = 7
"""Megatron-LM's TikTokenizer names 7 special tokens before its numbered fillers."""


@dataclass(frozen=True)
class TokenizerArgs:
    """The tokenizer flags (the same fields in ``DataConfig`` and in tools/preprocess_data.py);
    hashable and picklable, so worker processes can rebuild the same tokenizer."""

    tokenizer_type: str = "byte"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    tiktoken_pattern: str = "v2"
    tiktoken_num_special_tokens: int = 1000

    @classmethod
    def of(cls, config: Any) -> "TokenizerArgs":
        """The tokenizer fields of any object that has them (``DataConfig``, a namespace)."""
        return cls(**{f.name: getattr(config, f.name, f.default)
                      for f in dataclasses.fields(cls)})


TOKENIZER_FIELDS = tuple(f.name for f in dataclasses.fields(TokenizerArgs))
"""Names of the tokenizer flags' fields."""


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


def check_tokenizer_args(args: TokenizerArgs) -> None:
    """ValueError (one line naming the flag and the fix) when the flags do not fit the
    tokenizer type: a missing or superfluous file flag, or a misplaced ``--vocab-size``."""
    kind = args.tokenizer_type
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {kind!r} is not supported; use one of "
                         f"{list(TOKENIZER_TYPES)}")
    needed = _NEEDS.get(kind, ())
    for name in needed:
        if getattr(args, name) is None:
            raise ValueError(_missing_flag(kind, name))
    for name in ("tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
        extra = getattr(args, name) is not None and name not in needed
        if extra and not (kind == "TikTokenizer" and name == "vocab_size"):
            raise ValueError(_extra_flag(kind, name))
    if args.tiktoken_pattern not in TIKTOKEN_PATTERNS:
        raise ValueError(f"--tiktoken-pattern {args.tiktoken_pattern!r}: use one of "
                         f"{list(TIKTOKEN_PATTERNS)}")
    if args.tiktoken_num_special_tokens < TIKTOKEN_MIN_SPECIAL:
        raise ValueError(f"--tiktoken-num-special-tokens must be >= {TIKTOKEN_MIN_SPECIAL} "
                         "(<unk> <s> </s> <mask> <pad> <cls> <sep>), got "
                         f"{args.tiktoken_num_special_tokens}")


def _missing_flag(kind: str, name: str) -> str:
    if name == "vocab_size":
        return (f"--tokenizer-type {kind} needs --vocab-size N (the data's ids are < N; "
                "e.g. 50257 for GPT-2 BPE)")
    if name == "tokenizer_model":
        return f"--tokenizer-type {kind} needs --tokenizer-model PATH ({_MODEL[kind]})"
    return (f"--tokenizer-type {kind} needs --vocab-file VOCAB.json and --merge-file "
            "MERGES.txt (GPT-2 BPE files on this machine)")


def _extra_flag(kind: str, name: str) -> str:
    flag = "--" + name.replace("_", "-")
    if name == "vocab_size" and kind == "byte":
        return ("--vocab-size is for --tokenizer-type NullTokenizer (the byte tokenizer's "
                "vocabulary is fixed at 257)")
    if name == "vocab_size":
        return (f"--vocab-size is for --tokenizer-type NullTokenizer or TikTokenizer; "
                f"{kind} takes its vocabulary from its files: drop --vocab-size")
    return f"{flag} is not used by --tokenizer-type {kind}; drop it"


def build_tokenizer(config: Union[str, Any] = "byte", vocab_size: Optional[int] = None):
    """The tokenizer the flags name; ValueError (one line naming the flag) on bad flags,
    missing files, a hub name instead of a local path, or a missing tokenizer library.

    ``config``: a ``DataConfig``, a parsed preprocessing namespace or :class:`TokenizerArgs`
    (anything with the :data:`TOKENIZER_FIELDS`); or, as before, a ``--tokenizer-type`` string
    with ``vocab_size`` (enough for ``byte`` and ``NullTokenizer`` only). Tokenizers read from
    files are cached per process by their flags.
    """
    if isinstance(config, str):
        args = TokenizerArgs(tokenizer_type=config, vocab_size=vocab_size)
    else:
        args = config if isinstance(config, TokenizerArgs) else TokenizerArgs.of(config)
    check_tokenizer_args(args)
    if args.tokenizer_type == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    if args.tokenizer_type == "byte":
        return ByteTokenizer()
    from megatron_ext.data.text_tokenizers import check_text_tokenizer_files

    check_text_tokenizer_files(args)  # before the cache: a file or library may appear later
    return _load_text_tokenizer(args)


@functools.lru_cache(maxsize=8)
def _load_text_tokenizer(args: TokenizerArgs):
    from megatron_ext.data.text_tokenizers import load_text_tokenizer

    return load_text_tokenizer(args)
