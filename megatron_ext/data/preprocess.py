"""Text/JSONL/Parquet -> Megatron indexed dataset (``.bin``/``.idx``) with any tokenizer of
this package: ``preprocess()`` and CLI ``main(argv)`` (flags: :class:`PreprocessConfig` plus the
tokenizer flags of ``DataConfig``).

``tools/preprocess_data.py`` is a thin wrapper around :func:`main`. One JSONL line (its
``--json-key`` field), one Parquet row (its ``--parquet-column``) or one text file (or one
blank-line separated paragraph of it with ``--split-paragraphs``) is one document; ``eod`` is
appended to each document by default so that GPTDataset's packed samples keep document
boundaries visible to the model. Each document is stored as a single sequence, which is the
unit megatron's GPTDataset splits train/valid/test on.

The parent process reads the inputs and writes the output in input order; ``--workers N``
tokenizer processes do the tokenizing (:mod:`megatron_ext.data.tokenize_pool`), so the output
is byte-identical for any N. A progress line (documents/s, MB/s, ETA) goes to stderr every
``--progress-interval`` seconds. Reading and its UTF-8 rules: :mod:`megatron_ext.data.readers`;
atomic writing and signal cleanup: :mod:`megatron_ext.data.writer`. :func:`main` turns
SIGINT/SIGTERM into one line and exit status 130/143 after removing its partial output, and
every user error (inputs, flags, tokenizer files) into one line and exit status 2.
"""
from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

from megatron_ext.config_flags import FlagConfig, add_config_args
from megatron_ext.data.builder import add_tokenizer_args
from megatron_ext.data.progress import Progress
from megatron_ext.data.readers import (ERRORS, PreprocessError, expand_inputs, input_bytes,
                                       iter_documents, replaced_bytes)
from megatron_ext.data.tokenize_pool import chunk_documents, ordered_tokenizer
from megatron_ext.data.tokenizer import TokenizerArgs
from megatron_ext.data.writer import (_COMMITTING, Interrupted, megatron_indexed_dataset,
                                      quiet_megatron_import, stop_on_signals,
                                      write_indexed_dataset)
__all__ = ["PreprocessConfig", "PreprocessStats", "PreprocessError", "Interrupted", "main",
           "preprocess", "run_preprocess", "write_indexed_dataset", "_COMMITTING"]


@dataclass
class PreprocessConfig(FlagConfig):
    """What tools/preprocess_data.py reads and how (the tokenizer flags come from DataConfig)."""

    flag_group = "preprocessing"

    input: List[str] = field(default_factory=list, metadata={"argparse": {
        "required": True, "metavar": "PATH"}})
    """Files, directories (*.jsonl, *.json, *.ndjson, *.parquet, *.txt, *.text, *.md inside,
    recursive) or glob patterns. JSONL/Parquet: one document per line/row; text: one per file."""
    output_prefix: str = field(default="", metadata={"argparse": {"required": True}})
    """Writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx; pass it to --data-path."""
    json_key: str = field(default="text", metadata={"argparse": {"aliases": ["--json-keys"]}})
    """JSONL field holding the text (--json-keys: Megatron-LM's spelling, one key)."""
    parquet_column: str = "text"
    """Parquet column holding the text (reading Parquet needs pyarrow)."""
    split_paragraphs: bool = False
    """Text files: one document per blank-line separated paragraph."""
    append_eod: bool = True
    """Append the end-of-document token to every document (--no-append-eod: do not)."""
    errors: str = field(default="strict", metadata={"argparse": {"choices": ERRORS}})
    """Input that is not UTF-8: strict stops at the first bad byte, naming file and offset (as
    Megatron-LM's preprocessing); replace stores U+FFFD and reports how many bytes it replaced."""
    workers: int = 1
    """Tokenizer processes (the output is byte-identical for any number)."""
    progress_interval: float = 5.0
    """Seconds between progress lines on stderr (documents/s, MB/s, ETA); 0: none."""

    def __post_init__(self) -> None:
        if self.errors not in ERRORS:
            raise PreprocessError(f"--errors {self.errors!r}: use one of {list(ERRORS)}")
        if self.workers < 1:
            raise PreprocessError(f"--workers must be >= 1 (tokenizer processes), got "
                                  f"{self.workers}")
        if not self.progress_interval >= 0:
            raise PreprocessError(f"--progress-interval must be >= 0 seconds (0: no progress "
                                  f"lines), got {self.progress_interval}")


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
    errors: str = "strict"
    """What was done with bytes that are not UTF-8 (:data:`ERRORS`)."""
    replaced: dict = field(default_factory=dict)
    """``errors="replace"``: input file -> invalid UTF-8 bytes stored as U+FFFD."""
    text_bytes: int = 0
    """UTF-8 bytes of the documents' text (what MB/s is measured in)."""


def preprocess(inputs: Sequence[str], output_prefix: str,
               tokenizer: Union[str, Any] = "byte", **options) -> PreprocessStats:
    """Tokenize ``inputs`` (files, directories or globs) into ``output_prefix.{bin,idx}``.

    ``tokenizer``: a ``--tokenizer-type`` name, or anything with the tokenizer fields
    (``TokenizerArgs``, ``DataConfig``); ``options``: the other :class:`PreprocessConfig`
    fields (``json_key``, ``split_paragraphs``, ``append_eod``, ``errors``, ``workers``...).
    """
    config = PreprocessConfig(input=list(inputs), output_prefix=output_prefix, **options)
    return run_preprocess(config, tokenizer)


def run_preprocess(config: PreprocessConfig, tokenizer: Union[str, Any] = "byte"
                   ) -> PreprocessStats:
    """:func:`preprocess` from a config.

    Raises :class:`PreprocessError` for missing inputs, invalid JSON, a missing key, bad
    tokenizer flags or files, or (``errors="strict"``) a byte that is not UTF-8, before
    anything is renamed into place, and when no non-empty document is found.
    """
    args = (TokenizerArgs(tokenizer_type=tokenizer) if isinstance(tokenizer, str)
            else TokenizerArgs.of(tokenizer))
    stats = PreprocessStats(output_prefix=config.output_prefix,
                            files=expand_inputs(config.input), errors=config.errors)
    with ordered_tokenizer(args, config.append_eod, config.workers) as (tok, tokenize):
        megatron_indexed_dataset()  # its import is no part of the rates
        progress = Progress(input_bytes(stats.files), config.progress_interval,
                            prefix="preprocess_data.py: ")
        docs = _tokenized(tokenize, _texts(config, stats), progress)
        stats.documents, stats.tokens = write_indexed_dataset(
            config.output_prefix, _non_empty(docs, stats), tok.vocab_size)
    stats.text_bytes = progress.bytes
    return stats


def _texts(config: PreprocessConfig, stats: PreprocessStats) -> Iterator[Tuple[str, int]]:
    """``(text, UTF-8 bytes)`` of every non-empty document, in input order."""
    for path in stats.files:
        replaced_bytes(reset=True)
        for text in iter_documents(path, config.json_key, config.split_paragraphs,
                                   config.errors, config.parquet_column):
            if not text:
                stats.skipped_empty += 1
                continue
            yield text, len(text.encode("utf-8"))
        if config.errors == "replace":
            stats.replaced[path] = replaced_bytes(reset=True)


def _tokenized(tokenize, texts: Iterator[Tuple[str, int]], progress: Progress
               ) -> Iterator[numpy.ndarray]:
    """Token arrays of ``texts`` in order, counting finished chunks into ``progress``."""
    sizes: collections.deque = collections.deque()

    def chunks() -> Iterator[List[str]]:
        for chunk, nbytes in chunk_documents(texts):
            sizes.append(nbytes)
            yield chunk

    for arrays in tokenize(chunks()):
        progress.add(len(arrays), sizes.popleft())
        yield from arrays


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
        description="Tokenize text/JSONL/Parquet files into a Megatron indexed dataset "
                    "(.bin/.idx).")
    group = add_config_args(p, PreprocessConfig, PreprocessConfig.flag_group,
                            skip=("append_eod",))  # a switch that defaults to on:
    group.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    add_tokenizer_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status: 0 ok, 2 user error with a one-line message,
    130/143 stopped by SIGINT/SIGTERM (one line; the partial output removed)."""
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals(), quiet_megatron_import():
            stats = run_preprocess(PreprocessConfig.from_args(args), args)
            _report(stats)
    except Interrupted as stop:
        print(f"preprocess_data.py: stopped by {stop}; removed the partial output "
              f"({args.output_prefix}.bin/.idx left as they were)", file=sys.stderr)
        return 128 + stop.signum
    except (PreprocessError, OSError) as err:
        if isinstance(err, OSError):  # unreadable input, unwritable output, disk full...
            err = f"{err.filename or args.output_prefix}: {err.strerror or err}"
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    return 0


def _report(stats: PreprocessStats) -> None:
    print(f"wrote {stats.documents} documents, {stats.tokens} tokens "
          f"({stats.skipped_empty} empty skipped) from {len(stats.files)} file(s) "
          f"to {stats.output_prefix}.bin/.idx")
    if stats.errors == "replace":
        print(f"replaced {sum(stats.replaced.values())} invalid UTF-8 byte(s) with U+FFFD")
        if len(stats.files) > 1:
            for path, count in stats.replaced.items():
                if count:
                    print(f"  {path}: {count} byte(s)")
