"""Looking inside a run: the PyTorch profiler, NVTX ranges and CUDA memory history.

Main API: :class:`Profiler` (a training-loop component, ``--profile``,
``--record-memory-history``) and :func:`nvtx_range` (``--nvtx-ranges``).

``--profile`` records steps ``--profile-step-start`` to ``--profile-step-end`` on the ranks of
``--profile-ranks`` with ``torch.profiler`` and writes one trace per rank (``*.pt.trace.json``,
viewable in TensorBoard's profiler plugin or Perfetto). ``--record-memory-history`` (CUDA)
records every allocation from the start and writes a snapshot at the end
(``torch.cuda.memory._dump_snapshot``; drop it on pytorch.org/memory_viz).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from megatron_ext.training.hooks import Component


def nvtx_range(name: str, enabled: bool):
    """An NVTX range around a phase when ``enabled`` (on CUDA), else nothing."""
    if enabled and torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


class Profiler(Component):
    name = "profiler"

    def __init__(self, cfg, rank: int, log):
        self.cfg, self.rank, self.log = cfg, rank, log
        self.dir = cfg.profile_dir or os.path.join(cfg.tensorboard_dir or ".", "profile")
        self.active: Optional[torch.profiler.profile] = None
        self.profiling = cfg.profile and rank in cfg.profile_ranks
        if cfg.record_memory_history and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def describe(self) -> Optional[str]:
        parts = []
        if self.cfg.profile:
            parts.append(f"profiler: steps {self.cfg.profile_step_start}-"
                         f"{self.cfg.profile_step_end} on ranks {self.cfg.profile_ranks}")
        if self.cfg.record_memory_history:
            parts.append(f"memory history -> {self.cfg.memory_snapshot_path}")
        return "; ".join(parts) or None

    def on_step_start(self, state) -> None:
        if self.profiling and self.active is None \
                and state.iteration + 1 == self.cfg.profile_step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=False,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    self.dir, worker_name=f"rank{self.rank}"))
            self.active.__enter__()

    def after_step(self, state, step_time_s: float) -> None:
        if self.active is not None and state.iteration >= self.cfg.profile_step_end:
            self._stop()

    def _stop(self) -> None:
        self.active.__exit__(None, None, None)  # writes the trace
        self.active = None
        print(f"> rank {self.rank}: profiler trace of steps {self.cfg.profile_step_start}-"
              f"{self.cfg.profile_step_end} written to {self.dir}", flush=True)

    def finish(self, is_log_rank: bool) -> None:
        if self.active is not None:  # the run ended inside the profiled window
            self._stop()
        if self.cfg.record_memory_history and torch.cuda.is_available():
            path = self.cfg.memory_snapshot_path
            path = path if self.rank == 0 else f"{path}.rank{self.rank}"
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"> rank {self.rank}: CUDA memory snapshot written to {path}", flush=True)


__all__ = ["Profiler", "nvtx_range"]
