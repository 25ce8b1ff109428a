"""Cheap startup checks of Megatron indexed datasets (``PREFIX.bin``/``PREFIX.idx``):
``check_prefix``, ``check_indexed_dataset``, ``open_indexed_dataset``, ``max_token_id``,
``num_sequences``.

:func:`check_indexed_dataset` proves that an ``.idx`` and its ``.bin`` belong together before
any training: header sanity, the ``.idx`` size its header implies, and sum(sequence lengths) x
item size == the ``.bin`` size exactly, which catches a truncated or extended ``.bin``, an
``.idx`` claiming a dtype of another width (sizes cannot tell int16 from uint16) and an ``.idx``
of another dataset; also the sequence pointers at both ends, and document indices that run
from 0, never decreasing, to the sequence count. It reads the 34-byte header and memory-maps
the arrays (4 bytes per sequence and 8 per document are paged in; the ``.bin`` is only
``stat``-ed), so a blend of thousands of shards stays cheap. Datasets themselves are read by
megatron-core's own ``IndexedDataset``; whatever fails becomes one ``ValueError`` line that
names the file, instead of an assertion or a numpy error from inside megatron.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NoReturn, Tuple

import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset

# magic, version (<Q), dtype code (<B), sequence count (<Q), document count (<Q): the layout
# megatron's _IndexReader reads; the arrays follow it back to back.
_HEADER = struct.Struct("<9sQBQQ")


class _IndexedDataset(IndexedDataset):
    """megatron's ``__del__`` assumes the constructor finished; after a bad file it would print
    an "Exception ignored" trace to stderr on top of our one-line error."""

    def __del__(self) -> None:
        if hasattr(self, "index"):
            super().__del__()


@dataclass(frozen=True)
class IndexInfo:
    """What :func:`check_indexed_dataset` found in a consistent ``.idx``/``.bin`` pair."""

    dtype: numpy.dtype
    """Token dtype."""
    sequences: int
    """Sequences (one per document as our preprocessors write them)."""
    tokens: int
    """Tokens in the ``.bin`` (its size / the dtype's item size)."""


def check_prefix(prefix: str) -> None:
    """ValueError unless ``prefix`` is a suffix-less prefix whose .bin and .idx files exist."""
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(f"--data-path {prefix}: pass the prefix without the .bin/.idx suffix, "
                         f"i.e. {prefix[:-4]}")
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise ValueError(f"--data-path {prefix}: missing file {path}; create it with "
                             "tools/preprocess_data.py --output-prefix")


def check_indexed_dataset(prefix: str) -> IndexInfo:
    """ValueError (one line naming the file) unless ``prefix``'s ``.idx`` is sane and describes
    exactly its ``.bin``; see the module docstring for what is checked and what it costs."""
    check_prefix(prefix)
    try:
        return _check_pair(prefix)
    except OSError as err:  # e.g. no read permission: still one line naming the file
        _fail(prefix, f"cannot read {err.filename or prefix + '.idx'} ({err.strerror or err})")


def _check_pair(prefix: str) -> IndexInfo:
    """:func:`check_indexed_dataset` once both files are known to exist."""
    dtype, sequences, documents = _read_header(prefix)
    buffer = numpy.memmap(prefix + ".idx", mode="r")  # >= a header: _read_header checked
    lengths = numpy.frombuffer(buffer, numpy.int32, sequences, _HEADER.size)
    pointers = numpy.frombuffer(buffer, numpy.int64, sequences, _HEADER.size + 4 * sequences)
    doc_index = numpy.frombuffer(buffer, numpy.int64, documents, _HEADER.size + 12 * sequences)
    tokens = _check_lengths(prefix, dtype, lengths, pointers)
    _check_documents(prefix, doc_index, sequences)
    return IndexInfo(dtype=dtype, sequences=sequences, tokens=tokens)


def _read_header(prefix: str) -> Tuple[numpy.dtype, int, int]:
    """``(dtype, sequences, documents)`` of ``prefix.idx``, its size checked against them."""
    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        _fail(prefix, f"{path} is {'empty' if size == 0 else f'only {size} bytes'}, shorter "
                      f"than a Megatron index header ({_HEADER.size} bytes)")
    magic, version, code, sequences, documents = _HEADER.unpack(raw)
    if magic != _INDEX_HEADER:
        _fail(prefix, f"{path} is not a Megatron index (it does not start with {_INDEX_HEADER!r})")
    if version != 1:
        _fail(prefix, f"{path} has index version {version}; megatron-core reads version 1")
    if code not in {d.value for d in DType}:
        _fail(prefix, f"{path} has the unknown dtype code {code} (known: "
                      f"{', '.join(f'{d.value}={d.name}' for d in DType)})")
    expected = _HEADER.size + 12 * sequences + 8 * documents
    # Multimodal indices (megatron's builder option) append one mode byte per sequence.
    if size not in (expected, expected + sequences):
        _fail(prefix, f"{path} is {size} bytes but its header describes {expected} "
                      f"({sequences} sequences, {documents} document indices): the .idx is "
                      "truncated or has extra bytes")
    return numpy.dtype(DType.dtype_from_code(code)), sequences, documents


def _check_lengths(prefix: str, dtype: numpy.dtype, lengths: numpy.ndarray,
                   pointers: numpy.ndarray) -> int:
    """Tokens the index describes; the ``.bin`` must hold exactly that many bytes."""
    if lengths.size and int(lengths.min()) < 0:
        _fail(prefix, f"{prefix}.idx has a negative sequence length: the index is damaged")
    tokens = int(lengths.sum(dtype=numpy.int64))
    size = os.path.getsize(prefix + ".bin")
    if tokens * dtype.itemsize != size:
        _fail(prefix, f"{prefix}.bin is {size} bytes but {prefix}.idx describes "
                      f"{tokens * dtype.itemsize} ({tokens} {dtype.name} tokens in "
                      f"{lengths.size} sequences): the .bin is truncated or has extra bytes, "
                      "or the .idx belongs to another dataset or dtype")
    # Sequences are stored back to back: the first starts at 0, the last ends at the .bin's end.
    if lengths.size and (int(pointers[0]) != 0 or int(pointers[-1]) + int(lengths[-1])
                         * dtype.itemsize != size):
        _fail(prefix, f"{prefix}.idx has sequence pointers that do not match its lengths: "
                      "the index is damaged")
    return tokens


def _check_documents(prefix: str, doc_index: numpy.ndarray, sequences: int) -> None:
    """Document boundaries: from 0, never decreasing, ending at the sequence count."""
    if (doc_index.size == 0 or int(doc_index[0]) != 0 or int(doc_index[-1]) != sequences
            or bool((doc_index[1:] < doc_index[:-1]).any())):
        _fail(prefix, f"{prefix}.idx has document indices that do not run from 0 up to its "
                      f"{sequences} sequences: the index is damaged")


def _fail(prefix: str, problem: str) -> NoReturn:
    raise ValueError(f"--data-path {prefix}: {problem}; {_rebuild(prefix)}")


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """megatron's ``IndexedDataset(prefix)``, after :func:`check_indexed_dataset`."""
    check_indexed_dataset(prefix)
    try:
        # mmap=False leaves the .bin closed (megatron's mmap reader cannot open an empty one).
        return _IndexedDataset(prefix, mmap=False)
    except Exception as err:  # anything the checks above did not foresee
        raise ValueError(f"--data-path {prefix}: {prefix}.idx is not a readable Megatron "
                         f"index ({type(err).__name__}: {err}); {_rebuild(prefix)}") from None


def _rebuild(prefix: str) -> str:
    return f"rebuild it with tools/preprocess_data.py --output-prefix {prefix}"


def max_token_id(prefix: str, max_tokens: int = 1 << 20) -> int:
    """Largest id among the first ``max_tokens`` tokens of ``prefix`` (-1 if it has none): a
    cheap check that the data fits the vocabulary (a too-small one fails later inside the
    embedding)."""
    info = check_indexed_dataset(prefix)
    count = min(max_tokens, info.tokens)
    if count == 0:
        return -1
    # Our own read-only map of just these tokens: megatron's file reader retries failed reads
    # for over a minute, too long for a startup check.
    return int(numpy.memmap(prefix + ".bin", dtype=info.dtype, mode="r", shape=(count,)).max())


def num_sequences(prefix: str) -> int:
    """Elements megatron's GPTDataset splits train/valid/test by (sequences; one per document
    as our preprocessors write them)."""
    return int(GPTDataset.numel_low_level_dataset(open_indexed_dataset(prefix)))
