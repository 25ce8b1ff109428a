"""Configuration of what a run records: progress lines, TensorBoard, JSON lines, Weights &
Biases, the PyTorch profiler, NVTX ranges, CUDA memory history, a sample at the end.

Main API: :class:`LoggingConfig` (a flag per field, Megatron-LM's names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.config_flags import FlagConfig, require


@dataclass
class LoggingConfig(FlagConfig):
    """Progress lines, TensorBoard, JSON lines, W&B, profiler and memory snapshots."""

    flag_group = "logging"

    log_interval: int = 1
    """Print a progress line every this many steps."""
    tensorboard_dir: Optional[str] = None
    """Also write the metrics as TensorBoard scalars here."""
    log_json: Optional[str] = None
    """Also append the metrics as JSON lines to this file."""
    wandb_project: Optional[str] = None
    """Also log the metrics to this Weights & Biases project (WANDB_MODE=offline works)."""
    wandb_exp_name: Optional[str] = None
    """Name of the W&B run (a resumed run with --save continues the same W&B run)."""
    wandb_save_dir: Optional[str] = None
    """Directory of W&B's local files (default: W&B's own, ./wandb)."""
    profile: bool = False
    """Record a PyTorch profiler trace of steps --profile-step-start to --profile-step-end."""
    profile_step_start: int = 10
    """First profiled step."""
    profile_step_end: int = 12
    """Last profiled step."""
    profile_ranks: List[int] = field(default_factory=lambda: [0])
    """Global ranks that profile."""
    profile_dir: Optional[str] = None
    """Where the traces go (default: <tensorboard-dir>/profile, else ./profile)."""
    nvtx_ranges: bool = False
    """Mark data, forward-backward, GNS and optimizer with NVTX ranges (for nsys; CUDA)."""
    record_memory_history: bool = False
    """Record CUDA allocations and write a snapshot at the end (for pytorch.org/memory_viz)."""
    memory_snapshot_path: str = "snapshot.pickle"
    """Where --record-memory-history writes its snapshot (rank N adds .rankN)."""
    sample_prompt: Optional[str] = None
    """At the end, print the model's greedy continuation of this text (a sanity check)."""
    sample_length: int = 32
    """Tokens --sample-prompt generates."""

    def __post_init__(self):
        require(self.log_interval >= 1, "--log-interval must be >= 1")
        require(1 <= self.profile_step_start <= self.profile_step_end,
                "--profile-step-start must be >= 1 and <= --profile-step-end")
        require(self.sample_length >= 1, "--sample-length must be >= 1")


__all__ = ["LoggingConfig"]
