"""The whole configuration of a training job, built once from the command line.

Main API: :class:`JobConfig` (the core sections of :mod:`megatron_ext.training.config` plus
each feature's config), :func:`build_parser`, :func:`parse_job` (argv -> validated JobConfig)
and :func:`check_machine` (what this machine must have for the job).

Flags map 1:1 to fields (``--foo-bar`` is ``<section>.foo_bar``; a test checks that no flag
is unowned or owned twice). Each section checks its own fields in ``__post_init__``; every
check that spans sections lives in :meth:`JobConfig.__post_init__` (here, and nowhere
else), which also fills the defaults that depend on other sections (the global batch needs
the data-parallel size, the LR decay horizon needs the run length). Nothing is written back
into the argparse namespace. Bad values raise ``ValueError`` with one line naming the flag
and the fix; ``examples/pretrain_gpt.py`` prints it without a stack trace.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.batch_growth.config import BatchGrowthConfig
from megatron_ext.data.builder import DataConfig
from megatron_ext.gns.config import GNSConfig, include_embedding_problem
from megatron_ext.memory_planner.config import MemoryPlannerConfig
from megatron_ext.model.attention_config import AttentionConfig
from megatron_ext.training.config import (
    CORE_SECTIONS, CheckpointConfig, LoggingConfig, ModelConfig, OptimizerSettings,
    ParallelConfig, RecomputeConfig, ScheduleConfig, TrainingConfig, require)

#: Feature sections: (attribute of JobConfig, dataclass).
FEATURE_SECTIONS = (("data", DataConfig), ("attention", AttentionConfig), ("gns", GNSConfig),
                    ("memory", MemoryPlannerConfig), ("batch_growth", BatchGrowthConfig))
SECTIONS = CORE_SECTIONS + FEATURE_SECTIONS


@dataclass
class JobConfig:
    """Every setting of one training job; ``world_size`` is the number of processes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    gns: GNSConfig = field(default_factory=GNSConfig)
    memory: MemoryPlannerConfig = field(default_factory=MemoryPlannerConfig)
    batch_growth: BatchGrowthConfig = field(default_factory=BatchGrowthConfig)
    world_size: int = 1

    def __post_init__(self):
        self._check_layout()
        self._resolve_batch()
        self._resolve_schedule()
        self._check_features()

    # ------------------------------------------------------------------ derived values
    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.attention.context_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step and DP rank at the initial global batch."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    def model_shape(self, vocab_size: int):
        """The cost model's :class:`ModelShape` of this job's GPT (``vocab_size``: the
        tokenizer's, before padding): parameters and FLOPs for the log, the batch planner
        and the memory planner."""
        from megatron_ext.cost_model import ModelShape

        return ModelShape.from_megatron_args(self.model, vocab_size)

    # ------------------------------------------------------------------ checks
    def _check_layout(self) -> None:
        m, tp, pp, cp = self.model, self.tp, self.pp, self.cp
        require(self.world_size % (tp * pp * cp) == 0,
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"{tp} x --pipeline-model-parallel-size {pp} x --context-parallel-size {cp}: "
                f"change the sizes or the number of processes (torchrun --nproc_per_node)")
        require(m.num_attention_heads % tp == 0,
                f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}: pick heads that are a multiple of TP")
        require(m.num_query_groups is None or m.num_query_groups % tp == 0,
                f"--num-query-groups {m.num_query_groups} must be a multiple of "
                f"--tensor-model-parallel-size {tp}")
        require(not self.parallel.sequence_parallel or (m.seq_length // cp) % tp == 0,
                f"--sequence-parallel splits the sequence over TP: --seq-length {m.seq_length} "
                f"(/ --context-parallel-size {cp}) must be divisible by TP {tp}")
        require(m.ffn_size % tp == 0, f"--ffn-hidden-size {m.ffn_size} must be divisible by TP {tp}")
        require(m.num_layers % pp == 0, f"--num-layers {m.num_layers} is not divisible by "
                                        f"--pipeline-model-parallel-size {pp}")
        r = self.recompute
        require(r.recompute_num_layers is None or r.recompute_num_layers <= m.num_layers // pp,
                "--recompute-num-layers exceeds the layers per pipeline stage")
        require(cp == 1 or m.seq_length % (2 * cp) == 0,
                f"--seq-length {m.seq_length} must be divisible by 2 x --context-parallel-size "
                f"for the load-balanced causal split")
        require(cp == 1 or m.attention_dropout == 0,
                "--context-parallel-size > 1 needs --attention-dropout 0")
        require(self.parallel.dp_reduction != "hierarchical"
                or self.data_parallel_size * cp >= 2,
                "--dp-reduction hierarchical reduces over data-parallel ranks: it needs "
                "data-parallel size >= 2 (more processes, or --dp-reduction flat)")

    def _resolve_batch(self) -> None:
        t, dp = self.training, self.data_parallel_size
        if t.global_batch_size is None:
            t.global_batch_size = t.micro_batch_size * dp
        require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                f"--global-batch-size {t.global_batch_size} is not divisible by "
                f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}: use a "
                f"multiple of {t.micro_batch_size * dp}")
        require(self.pp == 1 or self.num_microbatches >= self.pp,
                f"pipeline parallelism needs at least {self.pp} micro-batches per step but "
                f"--global-batch-size {t.global_batch_size} gives {self.num_microbatches}: raise "
                f"the global batch or lower --micro-batch-size")
        if t.train_samples is not None:
            require(t.train_samples >= t.global_batch_size,
                    "--train-samples must be at least one --global-batch-size")
            # An upper bound for the progress line: the global batch only grows.
            t.train_iters = -(-t.train_samples // t.global_batch_size)
        elif t.train_iters is None:
            t.train_iters = 40

    def _resolve_schedule(self) -> None:
        s, t = self.schedule, self.training
        if s.lr_decay_iters is None:
            s.lr_decay_iters = t.train_iters
        if s.lr_warmup_fraction is not None:
            s.lr_warmup_iters = int(s.lr_warmup_fraction * s.lr_decay_iters)
        require(s.lr_warmup_iters <= s.lr_decay_iters,
                "--lr-warmup-iters exceeds --lr-decay-iters")
        if s.lr_warmup_samples is None:
            s.lr_warmup_samples = s.lr_warmup_iters * t.global_batch_size
        if s.lr_decay_samples is None:
            s.lr_decay_samples = (t.train_samples if t.train_samples is not None
                                  else s.lr_decay_iters * t.global_batch_size)
        require(s.lr_warmup_samples <= s.lr_decay_samples,
                "--lr-warmup-samples exceeds --lr-decay-samples")

    def _check_features(self) -> None:
        """Checks between a feature and the rest of the job (one place for all of them)."""
        self.batch_growth.validate_against(gns_enabled=self.gns.gns)
        require(self.batch_growth.lr_scaling != "adascale" or self.training.train_samples,
                "--lr-scaling adascale counts the run on its scale-invariant clock in samples: "
                "give the budget as --train-samples instead of --train-iters")
        require(self.logging.sample_prompt is None or (self.pp == 1 and self.cp == 1),
                "--sample-prompt needs --pipeline-model-parallel-size 1 and "
                "--context-parallel-size 1 (sample from a checkpoint under such a layout: "
                "--load DIR --sample-prompt TEXT)")
        g, dp = self.gns, self.data_parallel_size
        if g.gns_log_interval is None:
            g.gns_log_interval = self.logging.log_interval
        if not g.gns:
            return
        two_batch = g.gns_estimator == "data-parallel"
        require(not two_batch or dp >= 2,
                "--gns-estimator data-parallel compares per-rank and global gradients: it "
                "needs data-parallel size >= 2 (more processes, or --gns-estimator per-sample)")
        require(not two_batch or not self.parallel.overlap_grad_reduce,
                "--gns-estimator data-parallel reads gradients before the DP reduction: drop "
                "--overlap-grad-reduce")
        require(two_batch or self.training.global_batch_size >= 2,
                "--gns needs --global-batch-size >= 2 (per-sample estimator)")
        require(self.cp == 1, "--gns does not support --context-parallel-size > 1 yet "
                              "(per-sample norms would be partial over CP ranks)")
        problem = include_embedding_problem(not self.model.untie_embeddings_and_output_weights,
                                            self.pp, self.model.position_embedding_type)
        require(not g.gns_include_embedding or problem is None, problem or "")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, namespace: argparse.Namespace, world_size: int) -> "JobConfig":
        """Build every section from the parsed flags, then check the whole job."""
        sections = {name: section_cls.from_args(namespace) for name, section_cls in SECTIONS}
        return cls(**sections, world_size=world_size)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``examples/pretrain_gpt.py``: one group per section, a flag per field."""
    parser = argparse.ArgumentParser(
        description="GPT pretraining on megatron-core with megatron_ext features",
        allow_abbrev=False)
    for _, section_cls in SECTIONS:
        section_cls.add_args(parser)
    return parser


def parse_job(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> JobConfig:
    """Command line -> validated :class:`JobConfig` (``ValueError`` with one line if bad).

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 for a plain ``python`` run).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return JobConfig.from_args(build_parser().parse_args(argv), world_size)


def check_machine(job: JobConfig, cuda: Optional[bool] = None) -> None:
    """What the job needs from this machine (not from its flags): CUDA for mixed precision,
    nodes that split the data-parallel groups evenly for ``--dp-reduction hierarchical``,
    flash-attn for ``--attention-backend flash``, an existing
    ``--load`` directory (unless it is also ``--save``: a job script's auto-resume). Skipped
    by ``--plan-memory``, which plans GPU jobs anywhere."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    t = job.training
    require(cuda or not (t.bf16 or t.fp16),
            "--bf16/--fp16 need a CUDA GPU (megatron-core's mixed-precision optimizer is "
            "CUDA-only): drop the flag to train in fp32 on CPU")
    from megatron_ext.training.dp_reduction import node_layout_problem, ranks_per_node

    problem = node_layout_problem(job, ranks_per_node(world_size=job.world_size))
    require(problem is None, problem or "")
    if job.attention.attention_backend == "flash":
        from megatron_ext.model.attention import flash_attn_available

        require(cuda and flash_attn_available(),
                "--attention-backend flash needs CUDA and `pip install flash-attn`; use "
                "--attention-backend sdpa (or auto)")
    require(cuda or not job.logging.record_memory_history,
            "--record-memory-history records CUDA allocations: it needs a CUDA GPU")
    if job.logging.wandb_project:
        import importlib.util

        require(importlib.util.find_spec("wandb") is not None,
                "--wandb-project needs the wandb package: pip install 'megatron_ext[logging]'")
    load, save = job.checkpoint.load, job.checkpoint.save
    first_auto_resume = save is not None and load is not None \
        and os.path.abspath(load) == os.path.abspath(save)  # --save D --load D, first run
    require(load is None or os.path.isdir(load) or first_auto_resume,
            f"--load {load}: no such directory (a --save directory of an earlier run)")


__all__ = ["JobConfig", "SECTIONS", "build_parser", "parse_job", "check_machine"]
