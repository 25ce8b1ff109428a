"""Tokenizers of real text, read from local files: ``load_text_tokenizer(args)`` returns a
:class:`TextTokenizer` for Megatron-LM's ``--tokenizer-type`` names; ``check_text_tokenizer_files``
checks the paths and the library first (cheap, one line naming the flag).

* ``HuggingFaceTokenizer``: ``--tokenizer-model`` DIR (tokenizer_config.json naming the eos
  token + tokenizer.json), read by megatron-core's HF wrapper (transformers' AutoTokenizer); or
  a bare tokenizer.json, read by ``tokenizers`` (eod: the first of :data:`END_TOKENS` in it).
* ``SentencePieceTokenizer``: ``--tokenizer-model`` x.model, by megatron-core (sentencepiece).
* ``TikTokenizer``: ``--tokenizer-model`` vocabulary JSON in Megatron-LM's format (a list of
  {rank, token_bytes, token_str}), by megatron-core (tiktoken), its special ids first.
* ``GPT2BPETokenizer``: ``--vocab-file`` vocab.json + ``--merge-file`` merges.txt, by
  ``tokenizers``' byte-level BPE; eod is ``<|endoftext|>``.

megatron-core 0.16.1's own GPT2BPETokenizer route (``MegatronHFTokenizer``) loads the hub
model ``gpt2`` and passes the vocab file as the merges file, so it cannot run offline; the
same byte-level BPE is built here from the two files with the ``tokenizers`` library.
Encoding goes through the fast (Rust) tokenizer where there is one (megatron's HF wrapper
converts token strings to ids in Python, ~1.6x slower); tiktoken decodes whole byte strings
(megatron's decodes token by token, breaking multi-byte characters).

Nothing is downloaded: a path that does not exist (a hub name, say) stops before any library
is called, and the Hugging Face libraries are put in offline mode.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import OrderedDict
from typing import Callable, Iterable, List, Sequence

from megatron_ext.data.tokenizer import _MODEL, TokenizerArgs, _MegatronTokenizer

EXTRA = "pip install 'megatron_ext[tokenizers]'"
"""The install line named when a tokenizer library is missing."""
LIBRARIES = {"HuggingFaceTokenizer": ("transformers", "tokenizers"),
             "GPT2BPETokenizer": ("tokenizers",), "SentencePieceTokenizer": ("sentencepiece",),
             "TikTokenizer": ("tiktoken",)}
"""The packages each tokenizer type imports."""
END_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-document candidates of a bare tokenizer.json (it does not name its eos token)."""
GPT2_EOD = "<|endoftext|>"


class TextTokenizer(_MegatronTokenizer):
    """A library tokenizer behind this package's interface: ``vocab_size``, ``eod``,
    ``tokenize(text) -> ids`` (no special tokens added), ``detokenize(ids) -> text`` (special
    tokens and ids outside the vocabulary, e.g. model padding, dropped)."""

    def __init__(self, tokenizer_type: str, files: Sequence[str], vocab_size: int, eod: int,
                 encode: Callable[[str], List[int]], decode: Callable[[List[int]], str],
                 special: Iterable[int] = ()):
        self.tokenizer_type = tokenizer_type
        self.files = [os.path.abspath(f) for f in files]
        self._vocab_size, self.eod = int(vocab_size), int(eod)
        self._encode, self._decode = encode, decode
        self._special = frozenset(special) | {self.eod}

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, special tokens included (before model padding)."""
        return self._vocab_size

    def tokenize(self, text: str) -> List[int]:
        return list(self._encode(text))

    def detokenize(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids]
        return self._decode([i for i in keep if 0 <= i < self._vocab_size
                             and i not in self._special])

    @property
    def unique_identifiers(self) -> OrderedDict:
        ids = super().unique_identifiers
        ids.update(tokenizer_type=self.tokenizer_type, files=self.files, eod=self.eod)
        return ids

    def __repr__(self) -> str:
        return (f"{self.tokenizer_type}({', '.join(self.files)}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


def check_text_tokenizer_files(args: TokenizerArgs) -> None:
    """ValueError unless the tokenizer's files exist locally and its libraries are installed."""
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
        _local(args.vocab_file, "--vocab-file", "GPT-2's vocab.json")
        _local(args.merge_file, "--merge-file", "GPT-2's merges.txt")
    else:
        _local(args.tokenizer_model, "--tokenizer-model", _MODEL[kind])
    for module in LIBRARIES[kind]:
        if not _installed(module):
            raise ValueError(f"--tokenizer-type {kind} needs the {module} package: {EXTRA}")


def _local(path: str, flag: str, what: str) -> None:
    if os.path.exists(path):
        return
    hint = ""
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith("."):
        hint = (f" ({path!r} looks like a hub name: download it once, e.g. `huggingface-cli "
                f"download {path} --local-dir DIR`, and pass the local copy)")
    raise ValueError(f"{flag} {path}: no such local file or directory; nothing is downloaded, "
                     f"so pass {what}{hint}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def load_text_tokenizer(args: TokenizerArgs) -> TextTokenizer:
    """Read the tokenizer ``args`` names (after :func:`check_text_tokenizer_files`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: paths are local already
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
    loader = {"GPT2BPETokenizer": _gpt2_bpe, "HuggingFaceTokenizer": _huggingface,
              "SentencePieceTokenizer": _sentencepiece, "TikTokenizer": _tiktoken}
    return loader[args.tokenizer_type](args)


def _loading(kind: str, flag: str, path: str, load: Callable):
    """``load()``, with any library error turned into one line naming the file."""
    try:
        return load()
    except Exception as err:  # libraries raise anything from OSError to AssertionError
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{flag} {path}: cannot be read by --tokenizer-type {kind} "
                         f"({detail})") from None


def _no_eod(flag: str, path: str, what: str) -> ValueError:
    return ValueError(f"{flag} {path}: the tokenizer has no end-of-document token ({what}); "
                      "Megatron appends it after every document")


def _gpt2_bpe(args: TokenizerArgs) -> TextTokenizer:
    from tokenizers import ByteLevelBPETokenizer

    kind, vocab, merges = args.tokenizer_type, args.vocab_file, args.merge_file
    bpe = _loading(kind, "--vocab-file", vocab, lambda: ByteLevelBPETokenizer(vocab, merges))
    eod = bpe.token_to_id(GPT2_EOD)
    if eod is None:
        raise _no_eod("--vocab-file", vocab, f"{GPT2_EOD} is not in it")
    bpe.add_special_tokens([GPT2_EOD])  # as GPT-2's HF tokenizer: that text is the one id
    return TextTokenizer(kind, [vocab, merges], bpe.get_vocab_size(), eod,
                         lambda text: bpe.encode(text).ids, bpe.decode)


def _huggingface(args: TokenizerArgs) -> TextTokenizer:
    kind, path = args.tokenizer_type, args.tokenizer_model
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(path) and not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return _tokenizer_json(args)
    from megatron.core.tokenizers import MegatronTokenizer

    inner = _loading(kind, "--tokenizer-model", path, lambda: MegatronTokenizer.from_pretrained(
        folder, metadata_path={"library": "huggingface"}, use_fast=True))
    if inner.eod is None:
        raise _no_eod("--tokenizer-model", path, "set eos_token in tokenizer_config.json")
    hf = getattr(getattr(inner, "_tokenizer", None), "tokenizer", None)
    fast = getattr(hf, "backend_tokenizer", None)  # transformers' Rust tokenizer, if any
    encode = ((lambda text: fast.encode(text, add_special_tokens=False).ids) if fast is not None
              else inner.tokenize)
    special = getattr(hf, "all_special_ids", ())
    return TextTokenizer(kind, [path], inner.vocab_size, inner.eod, encode, inner.detokenize,
                         special)


def _tokenizer_json(args: TokenizerArgs) -> TextTokenizer:
    from tokenizers import Tokenizer

    kind, path = args.tokenizer_type, args.tokenizer_model
    tok = _loading(kind, "--tokenizer-model", path, lambda: Tokenizer.from_file(path))
    found = [t for t in END_TOKENS if tok.token_to_id(t) is not None]
    if not found:
        raise _no_eod("--tokenizer-model", path, f"none of {', '.join(END_TOKENS)}; pass the "
                      "directory whose tokenizer_config.json names eos_token")
    special = [tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values()
               if t.special]
    return TextTokenizer(kind, [path], tok.get_vocab_size(with_added_tokens=True),
                         tok.token_to_id(found[0]),
                         lambda text: tok.encode(text, add_special_tokens=False).ids,
                         tok.decode, special)


def _sentencepiece(args: TokenizerArgs) -> TextTokenizer:
    from megatron.core.tokenizers import MegatronTokenizer

    kind, path = args.tokenizer_type, args.tokenizer_model
    inner = _loading(kind, "--tokenizer-model", path, lambda: MegatronTokenizer.from_pretrained(
        path, metadata_path={"library": "sentencepiece"}))
    if inner.eod is None or inner.eod < 0:
        raise _no_eod("--tokenizer-model", path, "train it with eos_id >= 0")
    return TextTokenizer(kind, [path], inner.vocab_size, inner.eod, inner.tokenize,
                         inner.detokenize)


def _tiktoken(args: TokenizerArgs) -> TextTokenizer:
    from megatron.core.tokenizers import MegatronTokenizer

    kind, path = args.tokenizer_type, args.tokenizer_model
    specials = args.tiktoken_num_special_tokens
    ranks = _loading(kind, "--tokenizer-model", path, lambda: _tiktoken_ranks(path))
    vocab_size = ranks + specials if args.vocab_size is None else args.vocab_size
    if not specials < vocab_size <= ranks + specials:
        raise ValueError(f"--vocab-size {vocab_size}: {path} holds {ranks} tokens after "
                         f"{specials} special ids; use more than {specials} and at most "
                         f"{ranks + specials}")
    inner = _loading(kind, "--tokenizer-model", path, lambda: MegatronTokenizer.from_pretrained(
        path, metadata_path={"library": "tiktoken"}, vocab_size=vocab_size,
        pattern=args.tiktoken_pattern, num_special_tokens=specials))
    encoding = inner._tokenizer.tokenizer  # tiktoken.Encoding: decodes whole byte strings
    return TextTokenizer(kind, [path], inner.vocab_size, inner.eod, inner.tokenize,
                         lambda ids: encoding.decode(ids, errors="replace"), range(specials))


def _tiktoken_ranks(path: str) -> int:
    """The number of tokens in Megatron-LM's tiktoken JSON (ValueError if it is not one)."""
    if not path.endswith(".json"):
        raise ValueError("Megatron-LM's TikTokenizer reads a .json vocabulary")
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
    if not (isinstance(vocab, list) and vocab and isinstance(vocab[0], dict)
            and set(vocab[0]) == {"rank", "token_bytes", "token_str"}):
        raise ValueError("expected a JSON list of {rank, token_bytes, token_str}")
    return len(vocab)
