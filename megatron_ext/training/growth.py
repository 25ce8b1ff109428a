"""Build the dynamic-global-batch controller for a training run.

Main API: :func:`build_controller`.
"""

from __future__ import annotations

import argparse

import torch

from megatron_ext.batch_growth.controller import BatchController
from megatron_ext.batch_growth.planner import BatchPlanner, gpt_flops_per_sample, gpt_param_count
from megatron_ext.batch_growth.topology import detect, parse_topology


def _max_micro_batch(args: argparse.Namespace, vocab_size: int) -> int:
    """On a GPU, the memory planner's largest micro-batch for this device (never below the
    requested one); on CPU, the requested micro-batch."""
    if not torch.cuda.is_available():
        return args.micro_batch_size
    from megatron_ext.memory_planner import max_micro_batch_size
    from megatron_ext.training.memory_report import model_shape_and_layout

    model, layout = model_shape_and_layout(args, vocab_size)
    budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return max(args.micro_batch_size, max_micro_batch_size(model, layout, budget))


def build_controller(args: argparse.Namespace, cfg, dp_size: int, vocab: int) -> BatchController:
    topology = detect() if cfg.topology == "auto" else parse_topology(cfg.topology)
    planner = BatchPlanner(
        gpt_flops_per_sample(args.num_layers, args.hidden_size, args.seq_length, vocab,
                             ffn=args.ffn_hidden_size),
        gpt_param_count(args.num_layers, args.hidden_size, args.seq_length, vocab,
                        ffn=args.ffn_hidden_size),
        topology, dp_size=dp_size, tp_size=args.tensor_model_parallel_size,
        pp_size=args.pipeline_model_parallel_size,
        max_micro_batch_size=_max_micro_batch(args, vocab), seq_length=args.seq_length,
        mfu_assumed=cfg.mfu_assumed,
    )
    return BatchController(cfg, args.global_batch_size, planner)
