"""Everything a training run is made of, built once from its :class:`JobConfig`.

Main API: :func:`setup` -> :class:`Run`, and :func:`run_step` (one optimizer step).

Order matters: process groups and seeds; which checkpoint to resume (its loop state decides
the data phase and the padded vocabulary); data (it fixes the vocabulary); components (GNS
must exist before the model, whose layer spec carries its recorder); the model and DDP; the
optimizer and the LR schedule; the resume; megatron-core's micro-batch calculator
configured from the train state.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from megatron_ext.training.hooks import Component, call_hooks


@dataclass
class StepResult:
    losses: list
    grad_norm: Optional[float]
    update_ok: bool
    seconds: float
    """Forward/backward + optimizer wall time (synchronised on CUDA)."""


@dataclass
class Run:
    """The pieces of one run; ``state`` is the only owner of progress and batch shape."""

    job: object
    device: str
    state: object
    data: object
    gpt: torch.nn.Module
    model: torch.nn.Module
    optimizer: object
    lr_schedule: object
    checkpointer: object
    stop: object
    validator: object
    tester: object
    log: object
    timers: object
    forward_backward: object
    flops_per_sample: float
    is_log_rank: bool
    gns: Optional[Component] = None
    batch_growth: Optional[Component] = None
    components: List[Component] = field(default_factory=list)

    def lr_factor(self) -> float:
        return self.batch_growth.lr_factor(self.state) if self.batch_growth else 1.0

    def schedule_increment(self, lr_factor: float):
        """How far this step moves the schedule clock (None: by its global batch)."""
        return self.batch_growth.schedule_increment(lr_factor) if self.batch_growth else None


def _flat_config(job) -> dict:
    """Every flag's value (for W&B's run config)."""
    import dataclasses

    from megatron_ext.training.job import SECTIONS

    return {f.name: getattr(getattr(job, name), f.name)
            for name, cls in SECTIONS for f in dataclasses.fields(cls) if f.init}


def _profiler(job, log):
    if not (job.logging.profile or job.logging.record_memory_history):
        return None
    from megatron_ext.training.profiling import Profiler

    return Profiler(job.logging, torch.distributed.get_rank(), log)


def _is_log_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank(with_context_parallel=True) == 0)


def setup(job) -> Run:
    """Build the run of ``job`` on this rank (collective: every rank calls it)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.timers import Timers

    from megatron_ext.training import checkpointing
    from megatron_ext.training.checkpointer import Checkpointer
    from megatron_ext.training.components import build_components
    from megatron_ext.training.data import Evaluator, TrainData
    from megatron_ext.training.initialize import initialize_megatron
    from megatron_ext.training.lr_schedule import LRSchedule
    from megatron_ext.training.metrics import MetricsLogger
    from megatron_ext.training.model import build_gpt, build_optimizer
    from megatron_ext.training.state import TrainState, sync_microbatch_calculator
    from megatron_ext.training.stopping import StopConditions

    device = initialize_megatron(job)
    t = job.training
    state = TrainState(job.model.seq_length, t.global_batch_size, t.micro_batch_size,
                       job.data_parallel_size)
    log = MetricsLogger(_is_log_rank(), job.logging, job.checkpoint.save, _flat_config(job))
    checkpointer = Checkpointer(job.checkpoint, log)
    resume_from = checkpointer.prepare()
    saved = checkpointing.peek_loop_state(resume_from) if resume_from else {}
    progress = {} if checkpointer.finetune else saved  # finetune: data from sample 0
    data = TrainData(job, device, progress.get("data"),
                     progress.get("train_state", {}).get("consumed_samples", 0))
    shape = job.model_shape(data.vocab_size)
    padded_vocab = checkpointing.padded_vocab_to_use(saved, shape, job.tp, log)
    checkpointer.signature = checkpointing.model_signature(job.model, padded_vocab)
    checkpointer.model_config = asdict(job.model)
    gns, growth = build_components(job, shape, log)
    if growth is not None and t.train_samples is not None:
        log.sample_budget = t.train_samples  # the batch grows: progress in samples
    built = build_gpt(job, padded_vocab, gns.model_options() if gns else None)
    gpt, model = built.gpt, built.ddp
    if gns:
        gns.attach([model], built.config)
    optimizer = build_optimizer(job, built.config, model)
    forward_backward = get_forward_backward_func()
    run = Run(job=job, device=device, state=state, data=data, gpt=gpt, model=model,
              optimizer=optimizer, lr_schedule=LRSchedule(job.schedule, job.optimizer, optimizer),
              checkpointer=checkpointer, stop=StopConditions(t, device),
              validator=Evaluator(job, data, forward_backward, "valid"),
              tester=Evaluator(job, data, forward_backward, "test"),
              log=log, timers=Timers(log_level=1, log_option="max"),
              forward_backward=forward_backward, flops_per_sample=shape.flops_per_sample(job.tp),
              is_log_rank=log.enabled, gns=gns, batch_growth=growth,
              components=[c for c in (gns, growth, _profiler(job, log)) if c is not None])
    if growth:
        growth.lr_fraction = run.lr_schedule.fraction  # (the schedule is built after it)
    if resume_from:
        checkpointer.resume(resume_from, state, run, keep_batch=growth is None)
        log.resume_at(state.iteration)
    for note in data.notes:
        log.announce(note)
    sync_microbatch_calculator(state)
    _announce(run, built.attention, padded_vocab)
    return run


def _announce(run: Run, attention_desc: str, padded_vocab: int) -> None:
    from megatron_ext.training.initialize import optimizer_impl

    job = run.job
    parts = [c.describe() for c in run.components] + [run.lr_schedule.describe()]
    run.log.announce(
        f"megatron_ext: {run.device.upper()} ({torch.distributed.get_backend()}), world "
        f"{job.world_size} = TP {job.tp} x PP {job.pp} x CP {job.cp} x DP "
        f"{job.data_parallel_size}; core attention: {attention_desc}; optimizer: "
        f"{optimizer_impl(run.optimizer)}; parameters on rank 0: "
        f"{sum(p.numel() for p in run.gpt.parameters()) / 1e6:.2f} M; " + "; ".join(parts))
    run.log.announce(f"data: {run.data.description}; vocab {run.data.vocab_size} padded to "
                     f"{padded_vocab}")


def run_step(run: Run, micro_batches: list) -> StepResult:
    """Forward/backward over this rank's micro-batches, then the optimizer step.

    Components see the gradients between the two (``after_backward``: reduced over DP,
    not yet clipped), which is where the GNS measurement reads them.
    """
    state = run.state
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    t0 = time.perf_counter()
    with phase(run, "forward-backward"):
        losses = run.forward_backward(
            forward_step_func=run.data.forward_step, data_iterator=iter(micro_batches),
            model=[run.model], num_microbatches=len(micro_batches),
            seq_length=run.data.local_seq_length, micro_batch_size=state.micro_batch_size,
            forward_only=False)
    with phase(run, "gns"):
        call_hooks(run.components, "after_backward", state)
    with phase(run, "optimizer"):
        update_ok, grad_norm, _ = run.optimizer.step()
    if run.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if run.batch_growth is not None:
        seconds = _slowest_rank(seconds, run.device)
    return StepResult(losses, None if grad_norm is None else float(grad_norm), bool(update_ok),
                      seconds)


def _slowest_rank(seconds: float, device: str) -> float:
    """The step time of the slowest rank. The batch controller decides from step times
    (goodput, the planner's refinement); every rank must see the same number or ranks would
    choose different global batches and the next collective would hang."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


@contextlib.contextmanager
def phase(run: Run, name: str):
    """Time a phase of the step with megatron-core's Timers (and mark it with NVTX)."""
    from megatron_ext.training.profiling import nvtx_range

    timer = run.timers(name, log_level=1)
    timer.start()
    with nvtx_range(name, run.job.logging.nvtx_ranges):
        yield
    timer.stop()


__all__ = ["Run", "StepResult", "phase", "run_step", "setup"]
