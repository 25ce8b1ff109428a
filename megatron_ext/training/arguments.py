"""Command-line arguments of ``examples/pretrain_gpt.py``.

Main API: :func:`build_parser`, :func:`parse_args`, :func:`validate_args`.

Flags keep Megatron-LM's names where Megatron-LM has them, so a Megatron command line mostly
works unchanged. Each megatron_ext feature contributes its own argument group through an
``add_<feature>_args(parser)`` function. Validation runs before any process-group work and
turns every bad combination into one line naming the flag and the fix
(:class:`ArgumentError`, printed by the script without a stack trace).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flag and the fix."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default seq-length")
    g.add_argument(
        "--position-embedding-type", choices=["learned_absolute", "rope"], default="rope"
    )
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--distributed-backend", choices=["auto", "nccl", "gloo"], default="auto")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)


def add_recompute_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation checkpointing")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro x DP")
    g.add_argument("--train-iters", type=int, default=40)
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples instead of a number of iterations "
                        "(the natural budget when the global batch grows)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration")


def add_lr_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default train-iters")
    g.add_argument("--lr-warmup-samples", type=int, default=None,
                   help="warmup length in samples (default: warmup iters x global batch)")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="decay horizon in samples (default: --train-samples, or decay iters x "
                        "global batch); the schedule counts tokens, so it stays right when "
                        "the global batch grows")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None, help="directory to save checkpoints to")
    g.add_argument("--load", type=str, default=None, help="directory to resume from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--log-json", type=str, default=None, help="also append metrics as JSON lines")


def feature_arg_adders() -> List[Callable[[argparse.ArgumentParser], None]]:
    """The ``add_<feature>_args`` of every megatron_ext feature."""
    from megatron_ext.batch_growth.config import add_batch_growth_args
    from megatron_ext.data.builder import add_data_args
    from megatron_ext.gns.config import add_gns_args
    from megatron_ext.memory_planner import add_memory_planner_args
    from megatron_ext.model.attention_config import add_attention_args

    return [add_data_args, add_attention_args, add_gns_args, add_memory_planner_args,
            add_batch_growth_args]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="GPT pretraining on megatron-core with megatron_ext features",
        allow_abbrev=False,
    )
    for add in (
        add_model_args,
        add_parallel_args,
        add_recompute_args,
        add_training_args,
        add_lr_args,
        add_checkpoint_args,
        add_logging_args,
        *feature_arg_adders(),
    ):
        add(parser)
    return parser


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check flag combinations and fill derived defaults. Raises :class:`ArgumentError`."""
    world_size = _world_size() if world_size is None else world_size

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ArgumentError(msg)

    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "train_iters", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "log_interval"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = getattr(args, "context_parallel_size", 1) or 1
    need(
        args.num_attention_heads % tp == 0,
        f"--num-attention-heads {args.num_attention_heads} is not divisible by "
        f"--tensor-model-parallel-size {tp}: pick heads that are a multiple of TP",
    )
    need(
        world_size % (tp * pp * cp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
        f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}: change the sizes "
        f"or the number of processes (torchrun --nproc_per_node)",
    )
    args.data_parallel_size = world_size // (tp * pp * cp)
    need(
        args.hidden_size % args.num_attention_heads == 0 or args.kv_channels,
        f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
        f"{args.num_attention_heads}: change one of them or set --kv-channels",
    )
    if args.num_query_groups is not None:
        args.group_query_attention = True
    if args.group_query_attention:
        need(args.num_query_groups is not None,
             "--group-query-attention needs --num-query-groups N")
        need(args.num_attention_heads % args.num_query_groups == 0,
             "--num-attention-heads must be a multiple of --num-query-groups")
        need(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} must be a multiple of "
             f"--tensor-model-parallel-size {tp}")
    need(not args.sequence_parallel or tp > 1,
         "--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag or raise TP")
    if args.sequence_parallel:
        need((args.seq_length // cp) % tp == 0,
             f"--sequence-parallel splits the sequence over TP: --seq-length {args.seq_length} "
             f"(/ --context-parallel-size {cp}) must be divisible by TP {tp}")
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    need(ffn % tp == 0, f"--ffn-hidden-size {ffn} must be divisible by TP {tp}")
    need(args.num_layers % pp == 0,
         f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    need(not (args.bf16 and args.fp16), "--bf16 and --fp16 are exclusive: pick one")

    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    need(
        args.global_batch_size % (args.micro_batch_size * dp) == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
        f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of "
        f"{args.micro_batch_size * dp}",
    )
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    if pp > 1:
        need(num_micro >= pp,
             f"pipeline parallelism needs at least {pp} micro-batches per step but "
             f"--global-batch-size {args.global_batch_size} gives {num_micro}: raise the global "
             f"batch or lower --micro-batch-size")

    if args.recompute_granularity == "full":
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
        need(args.recompute_num_layers <= args.num_layers // pp,
             "--recompute-num-layers exceeds the layers per pipeline stage")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        raise ArgumentError(
            "--recompute-method/--recompute-num-layers need --recompute-granularity full"
        )

    if args.train_samples is not None:
        need(args.train_samples >= args.global_batch_size,
             "--train-samples must be at least one --global-batch-size")
        # An upper bound: the global batch only grows, so the run may end earlier.
        args.train_iters = -(-args.train_samples // args.global_batch_size)

    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    need(args.max_position_embeddings >= args.seq_length,
         "--max-position-embeddings must be >= --seq-length")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        need(0 <= args.lr_warmup_fraction < 1, "--lr-warmup-fraction must be in [0, 1)")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    need(args.min_lr <= args.lr, "--min-lr must be <= --lr")
    need(args.lr_warmup_iters <= args.lr_decay_iters, "--lr-warmup-iters exceeds --lr-decay-iters")
    if args.lr_warmup_samples is None:
        args.lr_warmup_samples = args.lr_warmup_iters * args.global_batch_size
    if args.lr_decay_samples is None:
        args.lr_decay_samples = (args.train_samples if args.train_samples is not None
                                 else args.lr_decay_iters * args.global_batch_size)
    need(args.lr_warmup_samples <= args.lr_decay_samples,
         "--lr-warmup-samples exceeds --lr-decay-samples")
    if args.save_interval is not None:
        need(args.save is not None, "--save-interval needs --save DIR")
        need(args.save_interval >= 1, "--save-interval must be >= 1")
    if args.load is not None:
        need(os.path.isdir(args.load),
             f"--load {args.load}: no such directory (a --save directory of an earlier run)")
    return args


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None):
    """Parse and validate the command line (raises :class:`ArgumentError`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return validate_args(args, world_size)
