"""Input files -> documents for tools/preprocess_data.py: ``expand_inputs`` (files,
directories, globs) and ``iter_documents`` (one file's documents, by suffix: JSONL, Parquet or
plain text); :class:`PreprocessError` is the one-line user error of preprocessing.

Text input must be UTF-8: by default (``errors="strict"``, as Megatron-LM's own preprocessing
reads its input) an invalid byte stops the run with its file and byte offset, since silently
altered training text is the bigger surprise; ``errors="replace"`` stores U+FFFD instead and
counts the replaced bytes (:func:`replaced_bytes`). Parquet needs ``pyarrow`` (one line names
it when it is missing); its string column is decoded by pyarrow.
"""
from __future__ import annotations

import codecs
import glob
import json
import os
import re
import threading
from typing import Iterable, Iterator, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
INPUT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
"""Suffixes picked up when an input is a directory (other files there are ignored)."""
ERRORS = ("strict", "replace")
"""What ``--errors`` does with input that is not UTF-8 (see the module docstring)."""


class PreprocessError(ValueError):
    """A user error in the inputs (missing file, bad JSON, missing key); one-line message."""


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, directories (recursive, by suffix) and globs -> a sorted, de-duplicated file list."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, n) for n in names
                          if n.lower().endswith(INPUT_SUFFIXES)]
            if not found:
                raise PreprocessError(
                    f"--input {item}: directory holds no {'/'.join(INPUT_SUFFIXES)} files")
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
                   errors: str = "strict", parquet_column: str = "text") -> Iterator[str]:
    """Yield the documents of one input file (format chosen by suffix: JSONL, Parquet (one
    document per row of ``parquet_column``; null rows count as empty) or plain text).

    ``errors``: ``strict`` raises :class:`PreprocessError` at the first byte that is not UTF-8
    (naming its offset); ``replace`` decodes it as U+FFFD and adds it to :func:`replaced_bytes`.
    """
    if path.lower().endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, parquet_column)
        return
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


def _parquet_documents(path: str, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PreprocessError(f"{path}: reading Parquet needs the pyarrow package: "
                              "pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as err:  # pyarrow.ArrowInvalid and friends
        raise PreprocessError(f"{path}: not a readable Parquet file ({err})") from None
    if column not in names:
        raise PreprocessError(f"{path}: no column {column!r} (found {names}); set "
                              "--parquet-column")
    for batch in table.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise PreprocessError(f"{path}: column {column!r} holds "
                                      f"{type(text).__name__}, not strings")
            yield text or ""


def input_bytes(files: Sequence[str]) -> Optional[int]:
    """Total size of the text/JSONL inputs, for an ETA; None when a Parquet file (compressed,
    so its size says little about its text) is among them."""
    if any(f.lower().endswith(PARQUET_SUFFIXES) for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


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
