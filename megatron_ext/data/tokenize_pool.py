"""Documents -> token arrays, in worker processes and in input order: :func:`ordered_tokenizer`.

``with ordered_tokenizer(args, append_eod, workers) as (tokenizer, tokenize):`` gives the
tokenizer (built in this process too, for ``vocab_size``/``eod`` and the checks) and
``tokenize(chunks)``, which maps an iterable of document chunks (lists of texts) to lists of
token arrays, chunk by chunk in the order given, whatever ``workers`` is, so the output is
byte-identical for any number of workers. ``workers == 1`` tokenizes in this process; more
start a ``multiprocessing`` pool whose workers rebuild the tokenizer from its
:class:`~megatron_ext.data.tokenizer.TokenizerArgs`. At most ``2 x workers`` chunks are in
flight, so memory stays bounded however large the input. Workers ignore SIGINT (the parent
decides) and die on SIGTERM; leaving the ``with`` block, normally or not, ends them.

:func:`chunk_documents` groups texts into chunks of about ``CHUNK_BYTES``.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
from typing import Callable, Iterable, Iterator, List, Tuple

import numpy

from megatron_ext.data.readers import PreprocessError
from megatron_ext.data.tokenizer import TokenizerArgs, build_tokenizer

CHUNK_BYTES = 256 * 1024
"""Text per task sent to a worker: big enough to hide the hand-over, small enough to balance."""
CHUNK_DOCS = 1024
"""Documents per task at most (many tiny documents)."""

Encoder = Callable[[str], numpy.ndarray]
_worker_encode: List[Encoder] = []
"""The encoder of this worker process (set by :func:`_init_worker`)."""


def token_dtype(vocab_size: int) -> type:
    """megatron's smallest token dtype for ``vocab_size`` (uint16 below 65500, as
    ``DType.optimal_dtype``), so arrays cross processes at their stored size. Restated rather
    than imported: the pool's workers would otherwise import megatron-core (seconds each);
    tests/test_preprocess.py checks it agrees with ``DType.optimal_dtype``."""
    return numpy.uint16 if vocab_size is not None and vocab_size < 65500 else numpy.int32


def make_encoder(tokenizer, append_eod: bool) -> Encoder:
    """Text -> token array (``eod`` appended when asked) for any tokenizer of this package."""
    dtype = token_dtype(tokenizer.vocab_size)
    tail = [tokenizer.eod] if append_eod else []
    fast = getattr(tokenizer, "tokenize_bytes", None)  # the byte tokenizer: vectorised

    def encode(text: str) -> numpy.ndarray:
        if fast is not None:
            ids = fast(text.encode("utf-8"))
            return numpy.append(ids, numpy.array(tail, dtype=ids.dtype)) if tail else ids
        return numpy.array(tokenizer.tokenize(text) + tail, dtype=dtype)

    return encode


def _encode_chunk(encode: Encoder, texts: List[str]) -> List[numpy.ndarray]:
    try:
        return [encode(t) for t in texts]
    except Exception as err:  # e.g. NullTokenizer text that is not numbers
        raise PreprocessError(f"cannot tokenize a document ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from None


def _init_worker(args: TokenizerArgs, append_eod: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (forked)
    if not _worker_encode:  # spawned: a forked worker inherits the parent's encoder
        _worker_encode[:] = [make_encoder(build_tokenizer(args), append_eod)]


def _worker_chunk(texts: List[str]) -> List[numpy.ndarray]:
    return _encode_chunk(_worker_encode[0], texts)


def chunk_documents(texts: Iterable[Tuple[str, int]]) -> Iterator[Tuple[List[str], int]]:
    """``(text, its size in bytes)`` pairs -> ``(texts, their total bytes)`` chunks."""
    chunk: List[str] = []
    size = 0
    for text, nbytes in texts:
        chunk.append(text)
        size += nbytes
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


@contextlib.contextmanager
def ordered_tokenizer(args: TokenizerArgs, append_eod: bool, workers: int = 1):
    """Yield ``(tokenizer, tokenize)``; see the module docstring."""
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    try:
        tokenizer = build_tokenizer(args)
    except PreprocessError:
        raise
    except ValueError as err:  # bad tokenizer flags or files: the same one line
        raise PreprocessError(str(err)) from None
    if workers == 1:
        encode = make_encoder(tokenizer, append_eod)
        yield tokenizer, lambda chunks: (_encode_chunk(encode, c) for c in chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    fork = "fork" in methods
    # Forked workers inherit the tokenizer built above: loading a HuggingFace tokenizer
    # costs ~0.4 CPU-s per process, which on a few MB of text was a third of the work.
    _worker_encode[:] = [make_encoder(tokenizer, append_eod)] if fork else []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    pool = multiprocessing.get_context("fork" if fork else "spawn").Pool(
        workers, _init_worker, (args, append_eod))
    try:
        yield tokenizer, lambda chunks: _in_order(pool, chunks, 2 * workers)
    finally:
        pool.terminate()
        pool.join()
        _worker_encode.clear()


def _in_order(pool, chunks: Iterable[List[str]], window: int) -> Iterator[List[numpy.ndarray]]:
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_worker_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
