"""Zero-download default corpus: ``build_default_corpus(cache_dir, max_bytes) -> prefix``.

With no ``--data-path`` the first README command must still train on real text, so we
byte-tokenize the Python standard library's own ``*.py`` sources (present wherever Python is)
into a Megatron indexed dataset, one document per file. Files are taken in sorted relative-path
order, skipping ``test``/``tests``/``site-packages``, until ``max_bytes`` is reached, so the
corpus is deterministic for a given Python installation; it differs between Python versions
(3.11 vs 3.12), which is why the fingerprint (documents, tokens, sha256 of the file list) is
logged and stored next to the data in ``<prefix>.json``.

Concurrency: several ranks (or unrelated processes) may call this at once. Builders serialise
on an ``flock`` in the cache directory, the ``.bin``/``.idx`` pair is renamed into place, and
the ``.json`` marker is written last, so a caller only ever returns a complete corpus. With
``barrier`` given (e.g. ``torch.distributed.barrier``) only ``is_rank_zero`` builds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy

from megatron_ext.data.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_DIR = os.path.join("~", ".cache", "megatron_ext", "stdlib_corpus")
"""Where the corpus lives when neither ``cache_dir`` nor ``--data-cache-path`` is given."""

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
"""Directory names never descended into: tests hold odd encodings and huge generated files."""


def list_stdlib_sources(max_bytes: int, stdlib_dir: Optional[str] = None) -> list[tuple[str, int]]:
    """Sorted ``(relative posix path, size)`` of stdlib ``*.py`` files whose sizes sum <= max_bytes.

    Files are visited in sorted order; a file that would overflow the cap is skipped and the
    walk goes on, so small caps still fill up. Empty files are skipped.
    """
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                entries.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    chosen, total = [], 0
    for rel, path in sorted(entries):
        size = os.path.getsize(path)
        if 0 < size and total + size <= max_bytes:
            chosen.append((rel, size))
            total += size
    return chosen


def file_list_sha256(files: list[tuple[str, int]]) -> str:
    """sha256 over "path<TAB>size" lines: identifies the corpus contents cheaply."""
    h = hashlib.sha256()
    for rel, size in files:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def corpus_fingerprint(prefix: str) -> dict:
    """The fingerprint stored by :func:`build_default_corpus` (documents, tokens, sha, ...)."""
    with open(prefix + ".json", "r", encoding="utf-8") as f:
        return json.load(f)


def format_fingerprint(fp: dict) -> str:
    """One log line describing a corpus fingerprint."""
    return (f"default corpus: {fp['documents']} docs, {fp['tokens']} tokens, "
            f"file-list sha256 {fp['file_list_sha256'][:16]} "
            f"(Python {fp['python']} stdlib, max_bytes {fp['max_bytes']})")


def build_default_corpus(cache_dir: Optional[str] = None, max_bytes: int = 4_000_000, *,
                         is_rank_zero: bool = True, barrier: Optional[Callable[[], None]] = None,
                         stdlib_dir: Optional[str] = None) -> str:
    """Build (once) the stdlib byte corpus in ``cache_dir`` and return its path prefix.

    Idempotent: a complete corpus with the same file list is reused. Safe to call from many
    processes at once (file lock + atomic renames). ``barrier``: if given, only ``is_rank_zero``
    builds and every caller then waits on ``barrier()``; all ranks must call it.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0 (got {max_bytes})")
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CORPUS_DIR))
    files = list_stdlib_sources(max_bytes, stdlib_dir)
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    if not files:
        raise RuntimeError(
            f"no Python sources found under {root} for the default corpus; pass --data-path "
            "(see tools/preprocess_data.py) or --mock-data")
    sha = file_list_sha256(files)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The sha in the name keeps different Pythons/caps sharing one cache dir apart.
    prefix = os.path.join(cache_dir, f"stdlib_py{py.replace('.', '')}_{max_bytes}_{sha[:12]}")
    fingerprint = {"python": py, "stdlib_dir": root, "max_bytes": max_bytes, "files": len(files),
                   "file_list_sha256": sha}

    if barrier is None or is_rank_zero:
        _build_if_missing(prefix, root, files, fingerprint)
    if barrier is not None:
        barrier()
        if not _is_complete(prefix, sha):
            raise RuntimeError(f"rank 0 did not leave a default corpus at {prefix}: is "
                               f"{cache_dir} on a file system all ranks share?")
    logger.info("%s -> %s", format_fingerprint(corpus_fingerprint(prefix)), prefix)
    return prefix


def _is_complete(prefix: str, sha: str) -> bool:
    try:
        fp = corpus_fingerprint(prefix)
    except (OSError, ValueError):
        return False
    return (fp.get("file_list_sha256") == sha and os.path.exists(prefix + ".bin")
            and os.path.exists(prefix + ".idx"))


@contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """flock: serialises builders across processes (and threads: each open() gets its own lock)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: atomic renames alone keep readers safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_if_missing(prefix: str, root: str, files: list[tuple[str, int]], fingerprint: dict) -> None:
    from megatron_ext.data.preprocess import write_indexed_dataset

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with _exclusive_lock(prefix + ".lock"):
        if _is_complete(prefix, fingerprint["file_list_sha256"]):
            return
        tok = ByteTokenizer()
        eod = numpy.array([tok.eod], dtype=numpy.uint16)

        def docs() -> Iterator[numpy.ndarray]:
            for rel, _ in files:
                with open(os.path.join(root, rel), "rb") as f:
                    # Raw bytes: no decode/encode round trip, byte-exact with the file.
                    yield numpy.concatenate([tok.tokenize_bytes(f.read()), eod])

        n_docs, n_tokens = write_indexed_dataset(prefix, docs(), tok.vocab_size)
        fingerprint = dict(fingerprint, documents=n_docs, tokens=n_tokens)
        tmp = f"{prefix}.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=2, sort_keys=True)
        os.replace(tmp, prefix + ".json")  # the marker comes last: its presence means complete
        logger.info("built %s", format_fingerprint(fingerprint))
