"""What the run prints and records: progress lines, TensorBoard, JSON lines, W&B.

Main API: :class:`MetricsLogger` (every line format of the training log lives here),
:func:`tflops_per_gpu`, :func:`memory_gib`, :data:`TIMED_PHASES`.

When the global batch can grow and the run has a sample budget (``--train-samples``), the
progress line counts samples (``samples 5920/6000``) with an ETA from the measured throughput
instead of iterations of the initial batch (the iteration bound means nothing then).

Every scalar goes to every sink the flags ask for (TensorBoard ``train/<name>``, a JSON line,
Weights & Biases ``<name>``), so B_simple, the global batch and the GNS curves are in all of
them. A W&B run resumed with ``--save`` continues the W&B run of the first attempt (its id
is kept in ``<save>/wandb_run_id.txt``).

Only one rank writes (the caller says which: the last pipeline stage's first TP/DP rank,
which holds the loss). Per-phase times come from megatron-core's :class:`Timers`
(``forward-backward``, ``optimizer``, ``gns``, ``data``, ``checkpoint``), read and reset at
every progress line.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

#: Timer names of the per-phase breakdown, in the order the log prints them.
TIMED_PHASES = ("data", "forward-backward", "gns", "optimizer", "checkpoint")


def tflops_per_gpu(flops_per_sample: float, global_batch: int, seconds: float,
                   world_size: int) -> float:
    """Model TFLOP/s per GPU of one step (model FLOPs: no recompute, see ModelShape)."""
    return flops_per_sample * global_batch / seconds / world_size / 1e12


def memory_gib() -> float:
    """Peak allocated GPU memory; on CPU the process's resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


def _start_wandb(cfg, save_dir: Optional[str], run_config: dict):
    """A W&B run (resumed when ``save_dir`` remembers one); the caller checked the import."""
    import wandb

    id_file = os.path.join(save_dir, "wandb_run_id.txt") if save_dir else None
    run_id = None
    if id_file and os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip() or None
    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=cfg.wandb_save_dir,
                     config=run_config, id=run_id, resume="allow" if run_id else None)
    if id_file and not run_id:
        os.makedirs(save_dir, exist_ok=True)
        with open(id_file, "w") as f:
            f.write(run.id)
    return run


def _json_row(line: str) -> Optional[dict]:
    """One --log-json line, or None for a line cut short by a crash (or not a record)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _json_iteration(line: str) -> float:
    row = _json_row(line)
    return float("inf") if row is None else row.get("iteration", -1)


def _f(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


#: Decay of the throughput EMA behind the ETA (per progress line).
_RATE_DECAY = 0.9
#: What :attr:`MetricsLogger.history` keeps of a progress line.
_HISTORY = ("consumed_samples", "tokens", "lr", "lm_loss", "global_batch_size", "b_simple")


def samples_per_s(m: Dict[str, float]) -> float:
    """Measured throughput of the last steps (wall time per step since the last line)."""
    return m["global_batch_size"] / max(m["iteration_time_ms"] / 1e3, 1e-9)


def schedule_step(m: Dict[str, float]) -> float:
    """How far one step moves the clock --train-samples counts on: the global batch, or
    under AdaScale its gain times the initial batch."""
    return m.get("schedule_step_samples", m["global_batch_size"])


def steps_left(budget: int, m: Dict[str, float]) -> int:
    """Steps still to run at the current batch: an upper bound, the batch only grows."""
    done = m.get("schedule_samples", m["consumed_samples"])
    return math.ceil(max(0.0, budget - done) / max(schedule_step(m), 1e-9))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLogger:
    """Writes on one rank only (``enabled``); ``announce`` prints on global rank 0."""

    def __init__(self, enabled: bool, cfg, save_dir: Optional[str] = None,
                 run_config: Optional[dict] = None):
        """``cfg``: the LoggingConfig; ``run_config``: the job's settings for W&B."""
        self.enabled = enabled
        self.writer = self.json_file = self.wandb = None
        self.sample_budget: Optional[int] = None
        """--train-samples when the batch can grow: progress is counted in samples."""
        self.history: List[Dict[str, float]] = []  # the progress lines' numbers (dashboard)
        self._rate_batch, self._rate_sum, self._rate_weight = None, 0.0, 0.0
        self.tensorboard_dir, self.json_path = cfg.tensorboard_dir, cfg.log_json
        if not enabled:
            return
        self._open_tensorboard()
        if self.json_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
            self.json_file = open(self.json_path, "a")
        if cfg.wandb_project:
            self.wandb = _start_wandb(cfg, save_dir, run_config or {})

    def _open_tensorboard(self, purge_step: Optional[int] = None) -> None:
        if not self.tensorboard_dir:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=purge_step)
        except ImportError:
            logger.warning("tensorboard is not installed: --tensorboard-dir ignored "
                           "(pip install tensorboard)")

    def resume_at(self, iteration: int) -> None:
        """A resumed run continues after ``iteration``: drop what an earlier attempt logged
        past it (steps it ran after its last checkpoint), so each step is recorded once."""
        if not self.enabled:
            return
        if self.json_file is not None:
            self.json_file.close()
            with open(self.json_path) as f:
                lines = f.readlines()
            kept = [line for line in lines if _json_iteration(line) <= iteration]
            with open(self.json_path, "w") as f:
                f.writelines(kept)
            self.json_file = open(self.json_path, "a")
            if len(kept) < len(lines):
                self.announce(f"--log-json {self.json_path}: dropped {len(lines) - len(kept)} "
                              f"entries past iteration {iteration} (the run resumes there)")
        if self.writer is not None:  # TensorBoard's own way: purge events after the step
            self.writer.close()
            self._open_tensorboard(purge_step=iteration + 1)

    @staticmethod
    def announce(msg: str) -> None:
        """A ``> ...`` line on global rank 0 (startup, checkpoints, decisions)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"> {msg}", flush=True)

    def _throughput(self, m: Dict[str, float]) -> float:
        """Samples/s of the current batch: a bias-corrected EMA over the progress lines since
        the batch last changed (one step's wall time is noisy; a new batch runs at another
        rate, so the average restarts)."""
        batch = m["global_batch_size"]
        if batch != self._rate_batch:
            self._rate_batch, self._rate_sum, self._rate_weight = batch, 0.0, 0.0
        self._rate_sum = _RATE_DECAY * self._rate_sum + (1 - _RATE_DECAY) * samples_per_s(m)
        self._rate_weight = _RATE_DECAY * self._rate_weight + (1 - _RATE_DECAY)
        return self._rate_sum / self._rate_weight

    def _progress(self, iteration: int, train_iters: int, m: Dict[str, float]):
        """(the head of a progress line, the metrics plus ``eta_s`` in sample mode)."""
        if self.sample_budget is None:
            return [f" iteration {iteration:8d}/{train_iters:8d}",
                    f"consumed samples: {int(m['consumed_samples']):12d}"], m
        rate = self._throughput(m)
        # AdaScale counts --train-samples on its clock, which moves gain x initial batch per
        # step of global_batch_size samples (other runs: the clock is consumed_samples)
        done = m.get("schedule_samples", m["consumed_samples"])
        clock_rate = rate * schedule_step(m) / m["global_batch_size"]
        m = {**m, "samples_per_s": rate,
             "eta_s": max(0, self.sample_budget - done) / max(clock_rate, 1e-9)}
        return [f" samples {int(done):8d}/{self.sample_budget} "
                f"({100.0 * done / self.sample_budget:.1f}%)",
                f"ETA {format_eta(m['eta_s'])} at {rate:.1f} samples/s "
                f"(<= {steps_left(self.sample_budget, m)} steps of batch "
                f"{int(m['global_batch_size'])})",
                f"iteration {iteration:8d}"], m

    def iteration(self, iteration: int, train_iters: int, m: Dict[str, float]) -> None:
        """The progress line of one step (Megatron-LM's layout) plus its scalars."""
        if not self.enabled:
            return
        parts, m = self._progress(iteration, train_iters, m)
        parts += [
            f"elapsed time per iteration (ms): {m['iteration_time_ms']:.1f}",
            f"learning rate: {m['lr']:.6E}",
            f"global batch size: {int(m['global_batch_size']):5d}",
            f"lm loss: {m['lm_loss']:.6E}",
            f"grad norm: {m['grad_norm']:.3f}",
            f"tokens/s: {m['tokens_per_s']:.0f}",
            f"TFLOP/s/GPU: {m['tflops_per_gpu']:.2f}",
            f"mem: {m['memory_gib']:.2f} GiB",
        ]
        if "b_simple" in m:
            parts.append(f"B_simple: {m['b_simple']:.1f}")
        phases = [f"{p} {m['time/' + p]:.1f}" for p in TIMED_PHASES if f"time/{p}" in m]
        if phases:
            parts.append("ms: " + ", ".join(phases))
        print(" | ".join(parts), flush=True)
        self.history.append({"iteration": iteration, **{k: m[k] for k in _HISTORY if k in m}})
        self.scalars(iteration, m)

    def step_history(self) -> List[Dict[str, float]]:
        """Every progress line's numbers of the run: from --log-json when set (it spans the
        attempts of a resumed run), else this process's."""
        if self.json_file is None:
            return list(self.history)
        self.json_file.flush()
        with open(self.json_path) as f:
            rows = [_json_row(line) for line in f]
        return [r for r in rows if r is not None and "lm_loss" in r]

    def gns(self, iteration: int, r: Dict[str, float]) -> None:
        """Every --gns-log-interval steps: B_simple and its EMAs."""
        if not self.enabled:
            return
        print(f" gns iteration {iteration:8d} | tokens: {int(r['gns/tokens']):12d} | "
              f"B_simple: {_f(r['gns/b_simple']):.2f} | |G|^2: {r['gns/grad_sq_norm']:.4E} | "
              f"tr(Sigma): {r['gns/trace_sigma']:.4E} | skipped samples: "
              f"{int(r['gns/skipped_samples'])}", flush=True)
        self.scalars(iteration, r)

    def evaluation(self, iteration: int, loss: Optional[float], split: str = "valid") -> None:
        """The loss on the validation split (periodically) or the test split (at the end)."""
        if not self.enabled or loss is None:
            return
        name = "validation" if split == "valid" else split
        print(f" {name} loss at iteration {iteration}: {loss:.6E} | "
              f"ppl: {math.exp(min(loss, 50)):.3f}", flush=True)
        self.scalars(iteration, {f"{split}_lm_loss": loss})

    def growth(self, iteration: int, global_batch: int, plan, reason: str) -> None:
        """A batch-growth decision (``plan``: the planner's Plan, or None)."""
        how = (f"micro {plan.micro_batch_size} x {plan.num_microbatches} accumulation x DP "
               f"{plan.dp_size}, {plan.reduction} gradient reduction, predicted "
               f"{plan.predicted_step_time_s * 1e3:.2f} ms/step" if plan is not None else "")
        self.announce(f"batch growth at iteration {iteration}: global batch -> {global_batch}"
                      f"{f' ({how})' if how else ''}; {reason}")

    def scalars(self, iteration: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, iteration)
        if self.json_file is not None:
            self.json_file.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            self.json_file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                           step=iteration)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.json_file is not None:
            self.json_file.close()


__all__ = ["MetricsLogger", "TIMED_PHASES", "format_eta", "memory_gib",
           "samples_per_s", "steps_left", "tflops_per_gpu"]
