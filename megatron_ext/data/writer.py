"""Atomic, signal-safe writing of Megatron indexed datasets: :func:`write_indexed_dataset`
(token arrays -> ``PREFIX.bin``/``PREFIX.idx`` under a temporary name, renamed into place) and
:func:`stop_on_signals` (while active, SIGINT/SIGTERM raise :class:`Interrupted`, so the
``finally`` blocks remove partial output; a signal during the final renames waits).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
import warnings
from typing import Iterable, Iterator

import numpy


class Interrupted(BaseException):
    """SIGINT/SIGTERM under :func:`stop_on_signals`. A BaseException, like KeyboardInterrupt, so no
    ``except Exception`` on the way swallows it while ``finally`` blocks still clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_COMMITTING = threading.Event()
"""Set when :func:`write_indexed_dataset` starts renaming its outputs into place; from then on
the run is as good as done and is let finish rather than stop half-renamed."""
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
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
def quiet_megatron_import() -> Iterator[None]:
    """Hide megatron-core's import-time warnings (Transformer Engine/apex not installed...):
    preprocessing uses none of those accelerators, so they would only bury our own lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"megatron\.")
        yield


def megatron_indexed_dataset() -> tuple:
    """megatron-core's ``(DType, IndexedDatasetBuilder)``. The first call imports megatron
    (seconds): callers that time their work call this first."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    return DType, IndexedDatasetBuilder


def write_indexed_dataset(output_prefix: str, documents: Iterable[numpy.ndarray],
                          vocab_size: int) -> tuple[int, int]:
    """Write token arrays (one per document) to ``output_prefix.{bin,idx}`` atomically.

    Returns ``(documents, tokens)``. The token dtype is megatron's smallest fit for
    ``vocab_size`` (uint16 below 65500), which GPTDatasetConfig also infers from the tokenizer.
    On any error, :class:`Interrupted` included, the temporary files are removed and what was
    at ``output_prefix`` before is left as it was.
    """
    DType, IndexedDatasetBuilder = megatron_indexed_dataset()

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
