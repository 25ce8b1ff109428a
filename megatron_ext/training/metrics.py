"""Megatron-style progress lines, TensorBoard scalars and JSON-lines metrics.

Main API: :class:`MetricsLogger`, :func:`model_flops_per_sample`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch

from megatron_ext.batch_growth.planner import gpt_flops_per_sample

logger = logging.getLogger(__name__)


def model_flops_per_sample(args, vocab_size: int) -> float:
    """Model FLOPs of forward+backward for one sample (Narayanan et al. 2021), without
    recompute: the "model FLOPs" of MFU, so recomputation does not inflate TFLOP/s."""
    return gpt_flops_per_sample(
        args.num_layers, args.hidden_size, args.seq_length, vocab_size,
        ffn=args.ffn_hidden_size,
    )


def memory_gib() -> float:
    """Peak allocated GPU memory; on CPU the process's resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


class MetricsLogger:
    """Writes on one rank only (the caller decides which)."""

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], json_path: Optional[str]):
        self.enabled = enabled
        self.writer = None
        self.json_file = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=tensorboard_dir)
            except ImportError:
                logger.warning("tensorboard is not installed: --tensorboard-dir ignored "
                               "(pip install tensorboard)")
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            self.json_file = open(json_path, "a")

    def log_iteration(self, iteration: int, train_iters: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [
            f" iteration {iteration:8d}/{train_iters:8d}",
            f"consumed samples: {int(metrics['consumed_samples']):12d}",
            f"elapsed time per iteration (ms): {metrics['iteration_time_ms']:.1f}",
            f"learning rate: {metrics['lr']:.6E}",
            f"global batch size: {int(metrics['global_batch_size']):5d}",
            f"lm loss: {metrics['lm_loss']:.6E}",
            f"grad norm: {metrics['grad_norm']:.3f}",
            f"tokens/s: {metrics['tokens_per_s']:.0f}",
            f"TFLOP/s/GPU: {metrics['tflops_per_gpu']:.2f}",
            f"mem: {metrics['memory_gib']:.2f} GiB",
        ]
        if "b_simple" in metrics:
            parts.append(f"B_simple: {metrics['b_simple']:.1f}")
        print(" | ".join(parts), flush=True)
        self.scalars(iteration, metrics, tokens=int(metrics.get("tokens", 0)))

    def scalars(self, iteration: int, metrics: Dict[str, float], tokens: Optional[int] = None) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, iteration)
        if self.json_file is not None:
            self.json_file.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            self.json_file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.json_file is not None:
            self.json_file.close()
