"""Data phases: what the sample stream is, across resumes that change the data.

Main API: :class:`DataPhase`, :func:`data_identity`, :func:`continue_phases` (before the
dataset is built: which phase the run is in and how many samples to build it for) and
:func:`settle_length` (after: the built length agrees, or a new phase starts).

A phase is one dataset read in order: step k of the run reads the samples at
``consumed_samples - phase.start`` onwards. Its identity is everything that fixes the sample
order (data paths and blend, split, sequence length, seed, tokenizer) plus the number of
samples megatron-core built the dataset for (its shuffle depends on it). A resume with the
same identity rebuilds the dataset for the same number of samples and continues where the
checkpoint stopped, exactly, even when the run itself got longer (as long as the phase's
dataset holds enough samples; past that, a new phase is built). A resume that changes it
(context extension to a longer --seq-length, a new blend, a new --split) starts a new phase
at the resume step: no sample is repeated or skipped within a phase, and the change is one
line in the log. A changed --seed changes the order too, so it needs --allow-seed-change.
Pure Python.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class DataPhase:
    start: int
    """Consumed samples of the run when this phase began."""
    identity: Dict[str, Any]
    """What fixes the sample order (see :func:`data_identity`)."""
    samples: int
    """Train samples the dataset was built for (megatron-core's shuffle depends on it)."""
    total_samples: Optional[int] = None
    """Length of the built dataset (None until built)."""


def data_identity(job) -> Dict[str, Any]:
    d = job.data
    identity = {"data_path": list(d.data_path) if d.data_path else None, "split": d.split,
                "seq_length": job.model.seq_length, "seed": job.training.seed,
                "mock_data": d.mock_data, "default_corpus_mb": d.default_corpus_mb}
    for name in ("tokenizer_type", "vocab_size", "tokenizer_model", "vocab_file", "merge_file",
                 "tiktoken_pattern", "tiktoken_num_special_tokens"):
        identity[name] = getattr(d, name, None)
    return identity


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def continue_phases(saved: Optional[dict], identity: Dict[str, Any], samples: int,
                    consumed: int, allow_seed_change: bool
                    ) -> Tuple[List[DataPhase], List[str]]:
    """The phases of the run (the last is current; build its dataset for its ``samples``)
    and lines for the log. ``saved``: the checkpoint's data state (None: a fresh run;
    ``{"total_samples": N}``: written before phases existed). ValueError: a seed change."""
    if saved is None:
        return [DataPhase(0, identity, samples)], []
    if "phases" not in saved:  # format 1 or 2: same flags assumed, the length will tell
        return [DataPhase(0, identity, samples, int(saved["total_samples"]))], []
    phases = [DataPhase(**p) for p in saved["phases"]]
    last = phases[-1]
    if last.identity.get("seed") != identity["seed"] and not allow_seed_change:
        raise ValueError(f"--seed {identity['seed']} differs from the checkpoint's "
                         f"{last.identity.get('seed')}, which changes the data order: resume "
                         f"with --seed {last.identity.get('seed')}, or add --allow-seed-change "
                         f"to start a new data phase at sample {consumed}")
    if not _differences(last.identity, identity):  # (keys added later read as None)
        if last.total_samples is None or samples <= last.start + last.total_samples:
            return phases, []
        change = (f"the run now needs {samples} samples, past the {last.total_samples} this "
                  "phase's dataset was built for")
        samples -= consumed
    else:
        change = ", ".join(_differences(last.identity, identity))
    phases.append(DataPhase(consumed, identity, samples))
    return phases, [f"data phase {len(phases)} from sample {consumed}: {change}"]


def settle_length(phases: List[DataPhase], length: int, consumed: int) -> List[str]:
    """Record the built dataset's length; if the current phase expected another one (the
    files changed under the same flags), the run goes on in a new phase from ``consumed``."""
    current = phases[-1]
    if current.total_samples is None or current.total_samples == length:
        current.total_samples = length
        return []
    note = (f"data phase {len(phases) + 1} from sample {consumed}: the dataset now has "
            f"{length} samples where the checkpoint's had {current.total_samples}")
    phases.append(DataPhase(consumed, current.identity, current.samples, length))
    return [note]


def phases_state(phases: List[DataPhase]) -> dict:
    return {"phases": [asdict(p) for p in phases]}


__all__ = ["DataPhase", "data_identity", "continue_phases", "settle_length", "phases_state"]
