"""Cheap startup checks of Megatron indexed datasets (``PREFIX.bin``/``PREFIX.idx``):
``check_prefix``, ``open_indexed_dataset``, ``max_token_id``, ``num_sequences``.

The ``.idx`` is read by megatron-core's own ``IndexedDataset``: it memory-maps the index and
its arrays are views, so opening one costs a few page reads whatever the file size, and the
``.bin`` is not opened at all. Whatever megatron cannot read becomes one ``ValueError`` line
that names the file, instead of an assertion or a numpy error from inside megatron.
"""
from __future__ import annotations

import os

import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset



class _IndexedDataset(IndexedDataset):
    """megatron's ``__del__`` assumes the constructor finished; after a bad file it would print
    an "Exception ignored" trace to stderr on top of our one-line error."""

    def __del__(self) -> None:
        if hasattr(self, "index"):
            super().__del__()


def check_prefix(prefix: str) -> None:
    """ValueError unless ``prefix`` is a suffix-less prefix whose .bin and .idx files exist."""
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(f"--data-path {prefix}: pass the prefix without the .bin/.idx suffix, "
                         f"i.e. {prefix[:-4]}")
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise ValueError(f"--data-path {prefix}: missing file {path}; create it with "
                             "tools/preprocess_data.py --output-prefix")


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """megatron's ``IndexedDataset(prefix)``, its index checked against the ``.bin`` size."""
    check_prefix(prefix)
    try:
        # mmap=False leaves the .bin closed (megatron's mmap reader cannot open an empty one).
        dataset = _IndexedDataset(prefix, mmap=False)
    except Exception as err:  # bad magic/version/dtype, truncated arrays: all "not an index"
        raise ValueError(f"--data-path {prefix}: {prefix}.idx is not a readable Megatron "
                         f"index ({type(err).__name__}: {err}); {_rebuild(prefix)}") from None
    size, needed = os.path.getsize(prefix + ".bin"), _data_bytes(dataset)
    if size < needed:
        raise ValueError(f"--data-path {prefix}: {prefix}.bin is truncated ({size} bytes, its "
                         f"index addresses {needed}); {_rebuild(prefix)}")
    return dataset


def _rebuild(prefix: str) -> str:
    return f"rebuild it with tools/preprocess_data.py --output-prefix {prefix}"


def _data_bytes(dataset: IndexedDataset) -> int:
    """Bytes of ``.bin`` the index addresses (sequences are stored back to back)."""
    index = dataset.index
    if len(index) == 0:
        return 0
    itemsize = numpy.dtype(index.dtype).itemsize
    return int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize


def max_token_id(prefix: str, max_tokens: int = 1 << 20) -> int:
    """Largest id among the first ``max_tokens`` tokens of ``prefix`` (-1 if it has none): a
    cheap check that the data fits the vocabulary (a too-small one fails later inside the
    embedding)."""
    dataset = open_indexed_dataset(prefix)
    dtype = numpy.dtype(dataset.index.dtype)
    count = min(max_tokens, _data_bytes(dataset) // dtype.itemsize)
    if count == 0:
        return -1
    # Our own read-only map of just these tokens: megatron's file reader retries failed reads
    # for over a minute, too long for a startup check.
    return int(numpy.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(count,)).max())


def num_sequences(prefix: str) -> int:
    """Elements megatron's GPTDataset splits train/valid/test by (sequences; one per document
    as our preprocessors write them)."""
    return int(GPTDataset.numel_low_level_dataset(open_indexed_dataset(prefix)))
