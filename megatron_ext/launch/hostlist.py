"""Expand SLURM's compressed host lists, as ``scontrol show hostnames`` does.

Main API: :func:`expand_hostlist` (``"gpu[01-03,07],login1"`` -> ``["gpu01", "gpu02",
"gpu03", "gpu07", "login1"]``).

Syntax: hosts are separated by commas outside brackets; a bracket holds comma-separated
numbers and ``lo-hi`` ranges, and ``lo``'s width (leading zeros) sets the width of every
number of its range; a name with several bracket groups expands to their product in order
(``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2). Pure Python: the launcher must work where
``scontrol`` is missing (containers, tests).
"""
from __future__ import annotations

import itertools
import re
from typing import List

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class HostlistError(ValueError):
    """A host list that SLURM would not have written."""


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested '[' in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unmatched ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unmatched '[' in host list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_bracket(body: str, text: str) -> List[str]:
    """``01-03,07`` -> ["01", "02", "03", "07"], keeping the zero padding of each ``lo``."""
    out = []
    for item in body.split(","):
        m = _RANGE.fullmatch(item.strip())
        if not m:
            raise HostlistError(f"bad range {item!r} in host list {text!r}: expected N or "
                                "LO-HI with digits only")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostlistError(f"range {item!r} in host list {text!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, text: str) -> List[str]:
    # re.split with a capture group alternates literal text and bracket bodies.
    pieces = re.split(r"\[([^\]]*)\]", pattern)
    choices = [[p] if i % 2 == 0 else _expand_bracket(p, text) for i, p in enumerate(pieces)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand_hostlist(text: str) -> List[str]:
    """Every host name of a SLURM host list, in the order given."""
    if text is None or not text.strip():
        raise HostlistError("empty host list")
    hosts = []
    for pattern in _split_top_level(text.strip()):
        pattern = pattern.strip()
        if not pattern:
            raise HostlistError(f"empty host name in host list {text!r}")
        hosts.extend(_expand_host(pattern, text))
    return hosts


__all__ = ["HostlistError", "expand_hostlist"]
