"""A progress line every few seconds for long jobs: :class:`Progress`.

``Progress(total_bytes, interval)``; call ``add(documents, nbytes)`` as work completes; a line
such as ``preprocess_data.py: 120,000 docs, 96.0 MB in 30s: 4,000 docs/s, 3.20 MB/s, ETA 1m10s``
goes to stderr at most every ``interval`` seconds (0: never). The ETA is shown when the total
is known, and is approximate (it compares text bytes with input file bytes).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts documents and bytes; prints a rate line every ``interval`` seconds."""

    def __init__(self, total_bytes: Optional[int], interval: float, prefix: str = "",
                 stream: Optional[TextIO] = None, clock=time.monotonic):
        self.total_bytes, self.interval, self.prefix = total_bytes, interval, prefix
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = self.last = clock()
        self.documents = self.bytes = 0

    def add(self, documents: int, nbytes: int) -> None:
        self.documents += documents
        self.bytes += nbytes
        now = self.clock()
        if self.interval > 0 and now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line as of ``now``."""
        elapsed = max(1e-9, (self.clock() if now is None else now) - self.start)
        rate = self.bytes / elapsed
        text = (f"{self.prefix}{self.documents:,} docs, {self.bytes / 1e6:.1f} MB in "
                f"{format_duration(elapsed)}: {self.documents / elapsed:,.0f} docs/s, "
                f"{rate / 1e6:.2f} MB/s")
        if self.total_bytes and rate > 0:
            text += f", ETA ~{format_duration((self.total_bytes - self.bytes) / rate)}"
        return text
