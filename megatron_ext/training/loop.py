"""The pretraining loop behind ``examples/pretrain_gpt.py``.

Main API: :func:`main` (command line -> exit code) and :func:`train` (JobConfig -> final
TrainState).

One optimizer step (see ``session.run_step`` and ``hooks.py``):
  1. the sampler hands this DP rank its micro-batches of the global batch that starts at
     ``state.consumed_samples``;
  2. components prepare (GNS: which micro-batch split to measure); the LR schedule sets the
     LR for ``state.consumed_samples`` times the batch-growth scaling factor;
  3. ``get_forward_backward_func()`` runs the micro-batches, ``finalize_model_grads``
     reduces the gradients (per-token loss: divided by the global token count);
  4. components read the final gradients (GNS: B_simple), the optimizer steps;
  5. the state counts the step; components react (batch growth: maybe the next global
     batch); the logger, the validator, the stop conditions and the checkpointer each
     decide whether it is their turn.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import List, Optional

import torch

from megatron_ext.training.hooks import call_hooks
from megatron_ext.training.metrics import TIMED_PHASES, memory_gib, tflops_per_gpu

logger = logging.getLogger("megatron_ext")
_QUIET_RANK_EXIT_DELAY_S = 2.0


def train(job):
    """Run ``job`` on this rank; returns the final :class:`TrainState`."""
    from megatron_ext.training.errors import step_errors
    from megatron_ext.training.memory_report import out_of_memory_advice
    from megatron_ext.training.session import phase, run_step, setup
    from megatron_ext.training.state import sync_microbatch_calculator

    r = setup(job)
    state = r.state
    stop_reason = r.stop.before_start(state)
    oom_advice = lambda: out_of_memory_advice(job, job.model_shape(r.data.vocab_size))  # noqa: E731
    last_log = time.perf_counter()
    with r.checkpointer.recording_status(state, r.stop):
        while stop_reason is None:
            sync_microbatch_calculator(state)  # a grown batch takes effect at this boundary
            with phase(r, "data"):
                micro_batches = r.data.next_step(state)
            call_hooks(r.components, "on_step_start", state)
            factor = r.lr_factor()
            lr = r.lr_schedule.apply(state, factor)
            with step_errors(state.iteration + 1, r.checkpointer.last_path, oom_advice):
                step = run_step(r, micro_batches)
            tokens_per_step, global_batch = state.tokens_per_step, state.global_batch_size
            state.advance(r.schedule_increment(factor))
            loss = r.data.reduce_loss(step.losses)
            call_hooks(r.components, "after_step", state, step.seconds)
            if state.iteration % job.logging.log_interval == 0:
                now = time.perf_counter()
                seconds = (now - last_log) / job.logging.log_interval
                last_log = now
                r.log.iteration(state.iteration, job.training.train_iters, _step_metrics(
                    r, state, lr, loss, step, seconds, tokens_per_step, global_batch))
            if r.validator.due(state):
                r.log.evaluation(state.iteration, r.validator.run(r.model))
            stop_reason = r.stop.after_step(state, r.checkpointer.last_save_seconds,
                                            step.seconds)
            if r.checkpointer.due(state, stop_reason):
                r.checkpointer.save(state, r)
        _finish(r, state)
        r.log.announce(f"exiting after iteration {state.iteration}: {stop_reason}")
    r.log.close()
    return state


def _finish(r, state) -> None:
    """The end of a run: components wrap up; once the budget is spent, the test split and a
    sample if asked for. A run stopped early (signal, --exit-interval, --exit-duration-in-mins)
    skips them, as Megatron-LM does: a requeued job must save and leave before the scheduler's
    kill, and the run that completes the budget evaluates them."""
    for component in r.components:
        component.finish(r.is_log_rank)
    if not r.stop.complete(state):
        if r.tester.enabled or r.job.logging.sample_prompt is not None:
            r.log.announce("test split and --sample-prompt skipped: the run stopped before "
                           "its budget (the run that completes it evaluates them)")
        return
    if r.tester.enabled:
        r.log.evaluation(state.iteration, r.tester.run(r.model), split="test")
    prompt = r.job.logging.sample_prompt
    if prompt is not None:
        from megatron_ext.training.sampling import greedy_sample

        text = greedy_sample(r.model, r.data.tokenizer, prompt, r.job.logging.sample_length,
                             r.job.model.seq_length, r.job.tp, r.device)
        r.log.announce(f"sample after iteration {state.iteration}: {prompt!r} -> {text!r}")


def _step_metrics(r, state, lr, loss, step, seconds, tokens_per_step, global_batch) -> dict:
    """The numbers of one progress line (``seconds``: wall time per step since the last)."""
    n = r.job.logging.log_interval
    m = {"consumed_samples": state.consumed_samples, "tokens": state.consumed_tokens,
         "iteration_time_ms": seconds * 1e3, "lr": lr, "global_batch_size": global_batch,
         "lm_loss": loss if loss is not None else float("nan"),
         "grad_norm": step.grad_norm if step.grad_norm is not None else float("nan"),
         "tokens_per_s": tokens_per_step / seconds,
         "tflops_per_gpu": tflops_per_gpu(r.flops_per_sample, global_batch, seconds,
                                          r.job.world_size),
         "memory_gib": memory_gib(), "update_skipped": float(not step.update_ok)}
    for phase in TIMED_PHASES:  # per-step average since the last line, this rank
        m[f"time/{phase}"] = r.timers(phase, log_level=1).elapsed(reset=True) * 1e3 / n
    for component in r.components:
        m.update(component.metrics(state))
    return m


def _configure_logging() -> None:
    # Megatron warns at import about every optional accelerator it does not find; the
    # startup line says which paths actually run instead.
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=os.environ.get("MEGATRON_EXT_LOG_LEVEL",
                                             "INFO" if rank == 0 else "WARNING"),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # A failed save is reported by the checkpointer in one line with its cause.
    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.CRITICAL)


def _check_save_dir(path: str) -> None:
    """Create --save now and write a probe file, so that a bad path fails before training
    rather than at the first checkpoint (every rank writes its shards there)."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise ValueError(f"--save {path}: cannot write checkpoints there "
                         f"({e.strerror or e})") from None


def _error(msg: str, rank_prefix: bool = False) -> None:
    """One ``error:`` line: from every rank with its number for failures that are a rank's
    own, else (flags, checkpoints: every rank sees the same) from rank 0 only."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
    if not rank_prefix and rank != "0":
        # torchrun stops every worker as soon as one exits non-zero: leave rank 0 the moment
        # it needs to print the line this rank found too.
        time.sleep(_QUIET_RANK_EXIT_DELAY_S)
        return
    who = f"rank {rank}: " if rank_prefix and world > 1 else ""
    print(f"pretrain_gpt.py: error: {who}{msg}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, validate and train; every expected failure is one ``error:`` line."""
    _configure_logging()  # first: megatron-core warns while it is imported
    from megatron_ext.training.errors import (CheckpointMismatch, JobError, OutOfMemory,
                                              TrainingDiverged)
    from megatron_ext.training.job import check_machine, parse_job

    try:
        job = parse_job(argv)
        if job.memory.plan_memory:
            from megatron_ext.training.memory_report import print_memory_plan

            print_memory_plan(job)
            return 0
        check_machine(job)
        if job.checkpoint.save:
            _check_save_dir(job.checkpoint.save)
    except ValueError as e:
        _error(str(e))
        return 2
    try:
        train(job)
    except CheckpointMismatch as e:
        _error(str(e))
        return 2
    except (TrainingDiverged, OutOfMemory) as e:
        _error(str(e), rank_prefix=True)
        return 1
    except JobError as e:  # a failed save, an unwritable cache, ...: every rank knows
        _error(str(e))
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
