"""Text/JSONL -> Megatron indexed dataset (``.bin``/``.idx``): ``preprocess()`` and CLI ``main(argv)``.

``tools/preprocess_data.py`` is a thin wrapper around :func:`main`. One JSONL line (its
``--json-key`` field) or one text file (or one blank-line separated paragraph of it with
``--split-paragraphs``) is one document; ``eod`` is appended to each document by default so
that GPTDataset's packed samples keep document boundaries visible to the model. Each document
is stored as a single sequence, which is the unit megatron's GPTDataset splits train/valid/test
on. Output files are written under a temporary name and renamed, so a reader never sees a
half-written dataset.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy

from megatron_ext.data.tokenizer import BYTE_TOKENIZER_TYPES, build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
"""Suffixes picked up when an input is a directory (other files there are ignored)."""


class PreprocessError(ValueError):
    """A user error in the inputs (missing file, bad JSON, missing key); one-line message."""


@dataclass
class PreprocessStats:
    """What :func:`preprocess` wrote."""

    output_prefix: str
    """Prefix of the written ``.bin``/``.idx`` pair."""
    documents: int = 0
    """Documents written (empty ones are skipped, not counted)."""
    tokens: int = 0
    """Tokens written, ``eod`` included."""
    skipped_empty: int = 0
    """Documents skipped because their text was empty."""
    files: list = field(default_factory=list)
    """Input files read, in order."""


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, directories (recursive, by suffix) and globs -> a sorted, de-duplicated file list."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, n) for n in names
                          if n.lower().endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)]
            if not found:
                raise PreprocessError(
                    f"--input {item}: directory holds no {'/'.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} files")
            files += sorted(found)
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise PreprocessError(f"--input {item}: the pattern matches no file")
            files += found
        else:
            raise PreprocessError(f"--input {item}: no such file or directory")
    seen: set = set()
    return [f for f in files if not (os.path.abspath(f) in seen or seen.add(os.path.abspath(f)))]


def iter_documents(path: str, json_key: str = "text", split_paragraphs: bool = False) -> Iterator[str]:
    """Yield the documents of one input file (format chosen by suffix: JSONL or plain text)."""
    if path.lower().endswith(JSONL_SUFFIXES):
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PreprocessError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise PreprocessError(
                        f"{path}:{lineno}: no key {json_key!r} (found {keys}); set --json-key")
                text = record[json_key]
                if not isinstance(text, str):
                    raise PreprocessError(
                        f"{path}:{lineno}: key {json_key!r} holds {type(text).__name__}, not a string")
                yield text
    else:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if split_paragraphs:
            yield from (p.strip("\n") for p in re.split(r"\n[ \t]*\n", text))
        else:
            yield text


def write_indexed_dataset(output_prefix: str, documents: Iterable[numpy.ndarray],
                          vocab_size: int) -> tuple[int, int]:
    """Write token arrays (one per document) to ``output_prefix.{bin,idx}`` atomically.

    Returns ``(documents, tokens)``. The token dtype is megatron's smallest fit for
    ``vocab_size`` (uint16 below 65500), which GPTDatasetConfig also infers from the tokenizer.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = DType.optimal_dtype(vocab_size)
    n_docs = n_tokens = 0
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        for tokens in documents:
            # One sequence per document: [len(tokens)] is the per-sequence length list.
            builder.add_document(tokens, [int(tokens.size)])
            n_docs += 1
            n_tokens += int(tokens.size)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return n_docs, n_tokens


def preprocess(inputs: Sequence[str], output_prefix: str, json_key: str = "text",
               split_paragraphs: bool = False, append_eod: bool = True,
               tokenizer_type: str = "byte") -> PreprocessStats:
    """Tokenize ``inputs`` (files, directories or globs) into ``output_prefix.{bin,idx}``.

    Raises :class:`PreprocessError` for missing inputs, invalid JSON or a missing ``json_key``
    (before anything is renamed into place) and when no non-empty document is found.
    """
    tokenizer = build_tokenizer(tokenizer_type)
    stats = PreprocessStats(output_prefix=output_prefix, files=expand_inputs(inputs))
    eod = numpy.array([tokenizer.eod], dtype=numpy.uint16)

    def token_docs() -> Iterator[numpy.ndarray]:
        for path in stats.files:
            for text in iter_documents(path, json_key, split_paragraphs):
                if not text:
                    stats.skipped_empty += 1
                    continue
                ids = tokenizer.tokenize_bytes(text.encode("utf-8"))  # == tokenize(), vectorised
                yield numpy.append(ids, eod) if append_eod else ids

    stats.documents, stats.tokens = write_indexed_dataset(
        output_prefix, _non_empty(token_docs(), stats), tokenizer.vocab_size)
    return stats


def _non_empty(docs: Iterator[numpy.ndarray], stats: PreprocessStats) -> Iterator[numpy.ndarray]:
    """Pass documents through; fail (before the rename) when there were none at all."""
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise PreprocessError(
            f"no non-empty document in {len(stats.files)} input file(s); nothing written")


def build_parser() -> argparse.ArgumentParser:
    """The ``tools/preprocess_data.py`` argument parser."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize text/JSONL files into a Megatron indexed dataset (.bin/.idx).")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories (*.jsonl, *.json, *.txt, *.md inside, recursive) "
                        "or glob patterns; JSONL: one document per line, text: one per file")
    p.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx; pass it to --data-path")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--split-paragraphs", action="store_true",
                   help="text files: one document per blank-line separated paragraph")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    p.add_argument("--tokenizer-type", default="byte", choices=BYTE_TOKENIZER_TYPES,
                   help="tokenizer (default: byte)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error with a one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        stats = preprocess(args.input, args.output_prefix, json_key=args.json_key,
                           split_paragraphs=args.split_paragraphs, append_eod=args.append_eod,
                           tokenizer_type=args.tokenizer_type)
    except PreprocessError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {stats.documents} documents, {stats.tokens} tokens "
          f"({stats.skipped_empty} empty skipped) from {len(stats.files)} file(s) "
          f"to {stats.output_prefix}.bin/.idx")
    return 0
