"""Text/JSONL -> Megatron indexed dataset (``.bin``/``.idx``): ``preprocess()`` and CLI ``main(argv)``.

``tools/preprocess_data.py`` is a thin wrapper around :func:`main`. One JSONL line (its
``--json-key`` field) or one text file (or one blank-line separated paragraph of it with
``--split-paragraphs``) is one document; ``eod`` is appended to each document by default so
that GPTDataset's packed samples keep document boundaries visible to the model. Each document
is stored as a single sequence, which is the unit megatron's GPTDataset splits train/valid/test
on. Output files are written under a temporary name and renamed, so a reader never sees a
half-written dataset.

Input must be UTF-8: by default (``errors="strict"``, as Megatron-LM's own preprocessing reads
its input) an invalid byte stops the run with its file and byte offset, since silently altered
training text is the bigger surprise; ``errors="replace"`` stores U+FFFD instead and counts the
replaced bytes per file. :func:`main` turns SIGINT/SIGTERM into one line and exit status
130/143 after removing its partial output, and hides megatron-core's import-time warnings
about optional accelerators.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import json
import os
import re
import signal
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy

from megatron_ext.data.tokenizer import BYTE_TOKENIZER_TYPES, build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
"""Suffixes picked up when an input is a directory (other files there are ignored)."""
ERRORS = ("strict", "replace")
"""What ``--errors`` does with input that is not UTF-8 (see the module docstring)."""


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
    errors: str = "strict"
    """What was done with bytes that are not UTF-8 (:data:`ERRORS`)."""
    replaced: dict = field(default_factory=dict)
    """``errors="replace"``: input file -> invalid UTF-8 bytes stored as U+FFFD."""


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


def iter_documents(path: str, json_key: str = "text", split_paragraphs: bool = False,
                   errors: str = "strict") -> Iterator[str]:
    """Yield the documents of one input file (format chosen by suffix: JSONL or plain text).

    ``errors``: ``strict`` raises :class:`PreprocessError` at the first byte that is not UTF-8
    (naming its offset); ``replace`` decodes it as U+FFFD and adds it to :func:`replaced_bytes`.
    """
    # Text mode (universal newlines) as ever, so valid input gives the same bytes as before.
    try:
        with open(path, "r", encoding="utf-8",
                  errors="strict" if errors == "strict" else _COUNT_REPLACE) as f:
            if path.lower().endswith(JSONL_SUFFIXES):
                yield from _jsonl_documents(path, f, json_key)
            elif split_paragraphs:
                yield from (p.strip("\n") for p in re.split(r"\n[ \t]*\n", f.read()))
            else:
                yield f.read()
    except UnicodeDecodeError as err:
        raise PreprocessError(_not_utf8(path, err)) from None


def _jsonl_documents(path: str, lines: Iterable[str], json_key: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
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


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    """Python's ``replace`` decoding (one U+FFFD per invalid sequence), counting the bytes."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _replaced.bytes = replaced_bytes() + err.end - err.start
    return "\ufffd", err.end


# A codec error handler is looked up by name, so the count lives in a (per-thread) global.
_COUNT_REPLACE = "megatron_ext.count_replace"
_replaced = threading.local()
codecs.register_error(_COUNT_REPLACE, _count_and_replace)


def replaced_bytes(reset: bool = False) -> int:
    """Invalid UTF-8 bytes this thread replaced since the last reset (``errors="replace"``)."""
    count = getattr(_replaced, "bytes", 0)
    if reset:
        _replaced.bytes = 0
    return count


def _not_utf8(path: str, err: UnicodeDecodeError) -> str:
    """The message for ``errors="strict"``. The decoder's offsets are relative to a chunk, so
    the file is scanned again (only on this error path) for the absolute byte offset."""
    where = f"({err.reason})"
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):  # b"\n" never occurs inside a UTF-8 sequence
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                where = (f"at byte offset {offset + bad.start} (line {lineno}, byte "
                         f"0x{line[bad.start]:02x}: {bad.reason})")
                break
            offset += len(line)
    return (f"{path}: not valid UTF-8 {where}; fix the file, or pass --errors replace "
            "to store such bytes as U+FFFD")


def write_indexed_dataset(output_prefix: str, documents: Iterable[numpy.ndarray],
                          vocab_size: int) -> tuple[int, int]:
    """Write token arrays (one per document) to ``output_prefix.{bin,idx}`` atomically.

    Returns ``(documents, tokens)``. The token dtype is megatron's smallest fit for
    ``vocab_size`` (uint16 below 65500), which GPTDatasetConfig also infers from the tokenizer.
    On any error, :class:`Interrupted` included, the temporary files are removed and what was
    at ``output_prefix`` before is left as it was.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = DType.optimal_dtype(vocab_size)
    n_docs = n_tokens = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        for tokens in documents:
            # One sequence per document: [len(tokens)] is the per-sequence length list.
            builder.add_document(tokens, [int(tokens.size)])
            n_docs += 1
            n_tokens += int(tokens.size)
        builder.finalize(tmp + ".idx")
        _COMMITTING.set()  # a signal now waits: never one run's .bin beside another's .idx
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    finally:
        if builder is not None:
            builder.data_file.close()  # (finalize closed it already unless it failed)
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return n_docs, n_tokens


def preprocess(inputs: Sequence[str], output_prefix: str, json_key: str = "text",
               split_paragraphs: bool = False, append_eod: bool = True,
               tokenizer_type: str = "byte", errors: str = "strict") -> PreprocessStats:
    """Tokenize ``inputs`` (files, directories or globs) into ``output_prefix.{bin,idx}``.

    Raises :class:`PreprocessError` for missing inputs, invalid JSON, a missing ``json_key``
    or (``errors="strict"``) a byte that is not UTF-8, before anything is renamed into place,
    and when no non-empty document is found. ``errors="replace"``: see :func:`iter_documents`;
    the counts land in ``stats.replaced``.
    """
    if errors not in ERRORS:
        raise PreprocessError(f"--errors {errors!r}: use one of {list(ERRORS)}")
    tokenizer = build_tokenizer(tokenizer_type)
    stats = PreprocessStats(output_prefix=output_prefix, files=expand_inputs(inputs),
                            errors=errors)
    eod = numpy.array([tokenizer.eod], dtype=numpy.uint16)

    def token_docs() -> Iterator[numpy.ndarray]:
        for path in stats.files:
            replaced_bytes(reset=True)
            for text in iter_documents(path, json_key, split_paragraphs, errors):
                if not text:
                    stats.skipped_empty += 1
                    continue
                ids = tokenizer.tokenize_bytes(text.encode("utf-8"))  # == tokenize(), vectorised
                yield numpy.append(ids, eod) if append_eod else ids
            if errors == "replace":
                stats.replaced[path] = replaced_bytes(reset=True)

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


class Interrupted(BaseException):
    """SIGINT/SIGTERM while :func:`main` works. A BaseException, like KeyboardInterrupt, so no
    ``except Exception`` on the way swallows it while ``finally`` blocks still clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_COMMITTING = threading.Event()
"""Set when :func:`write_indexed_dataset` starts renaming its outputs into place; from then on
the run is as good as done and :func:`main` lets it finish rather than stop half-renamed."""
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While active, SIGINT/SIGTERM raise :class:`Interrupted`; the old handlers come back after."""
    # Only the main thread may set handlers; a shell starts background jobs with SIGINT
    # ignored, and Ctrl-C must keep leaving them alone.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS} if main_thread else {}
    previous = {s: h for s, h in previous.items() if h not in (signal.SIG_IGN, None)}

    def stop(signum: int, frame: object) -> None:
        if _COMMITTING.is_set():
            return
        for s in previous:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    _COMMITTING.clear()
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _quiet_megatron_import() -> Iterator[None]:
    """Hide megatron-core's import-time warnings (Transformer Engine/apex not installed...):
    preprocessing uses none of those accelerators, so they would only bury our own lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"megatron\.")
        yield


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
    p.add_argument("--errors", default="strict", choices=ERRORS,
                   help="input that is not UTF-8: strict stops at the first bad byte, naming "
                        "file and offset (default, as Megatron-LM's preprocessing); replace "
                        "stores U+FFFD and reports how many bytes it replaced")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status: 0 ok, 2 user error with a one-line message,
    130/143 stopped by SIGINT/SIGTERM (one line; the partial output removed)."""
    args = build_parser().parse_args(argv)
    try:
        with _stop_on_signals(), _quiet_megatron_import():
            stats = preprocess(args.input, args.output_prefix, json_key=args.json_key,
                               split_paragraphs=args.split_paragraphs,
                               append_eod=args.append_eod, tokenizer_type=args.tokenizer_type,
                               errors=args.errors)
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
