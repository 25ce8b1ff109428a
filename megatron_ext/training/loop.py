"""The pretraining loop: megatron-core parts wired together, with megatron_ext's features.

Main API: :func:`main` (what ``examples/pretrain_gpt.py`` runs) and :func:`train`.

One optimizer step:
  1. the sampler hands this DP rank its micro-batches of the current global batch (the batch
     may grow between steps; samples are never skipped or repeated);
  2. ``get_forward_backward_func()`` runs them (no pipelining or 1F1B for PP > 1), with the
     per-token loss summed and normalised by the global token count in
     ``finalize_model_grads``;
  3. the GNS tracker (``--gns``) turns per-sample gradient norms into B_simple;
  4. the optimizer steps with the token-based LR (times the batch-growth LR factor);
  5. the batch controller (``--batch-growth``) may pick the next global batch.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from megatron_ext.training.arguments import ArgumentError, parse_args

logger = logging.getLogger("megatron_ext")


def print_rank_0(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the step boundary and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, device: str) -> bool:
        """True on every rank if any rank got a signal: all ranks must stop (and save) at the
        same step, or the checkpoint's collectives would deadlock."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


def _optimizer_impl(optimizer) -> str:
    """Which Adam/SGD megatron-core picked (Transformer Engine's or apex's fused one when
    importable, else torch's), e.g. "torch.optim.adamw.AdamW"."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = getattr(chained[0], "optimizer", chained[0])
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def _check_save_dir(path: str) -> None:
    """Create --save now and write a probe file, so that a bad path fails before training
    rather than at the first checkpoint (every rank writes its shards there)."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise ArgumentError(f"--save {path}: cannot write checkpoints there "
                            f"({e.strerror or e})") from None


class TrainingDiverged(RuntimeError):
    """Non-finite gradients: training stops before the optimizer step touches the weights."""


def _diverged(e: RuntimeError, iteration: int, last_checkpoint: Optional[str]) -> TrainingDiverged:
    # megatron-core's DDP check: "... Unexpected result nan (message='found NaN in local grad
    # norm for bucket #0 ...')"; keep the part in quotes.
    msg = str(e)
    detail = msg.split("message='", 1)[-1].split(" in backward pass", 1)[0].rstrip("')")
    resume = (f"the last checkpoint is {last_checkpoint} (resume with --load)"
              if last_checkpoint else "no checkpoint was saved (see --save/--save-interval)")
    return TrainingDiverged(
        f"iteration {iteration}: non-finite gradients ({detail}); the weights were not "
        f"updated, {resume}. Lower --lr, set --clip-grad, or lengthen the warmup.")


class OutOfMemory(RuntimeError):
    """A step ran out of GPU memory (message: what was asked, the planner's view, knobs)."""


def _out_of_memory(e: Exception, iteration: int, args, cfgs, vocab_size: int) -> OutOfMemory:
    from megatron_ext.training.memory_report import out_of_memory_advice

    first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
    return OutOfMemory(f"iteration {iteration}: {first[:200].rstrip('.')}; "
                       f"{out_of_memory_advice(args, cfgs['memory'], vocab_size)}")


def _feature_configs(args: argparse.Namespace) -> Dict[str, Any]:
    """Each feature's dataclass config; their __post_init__ checks raise ValueError."""
    from megatron_ext.batch_growth.config import BatchGrowthConfig
    from megatron_ext.data.builder import DataConfig
    from megatron_ext.gns.config import GNSConfig
    from megatron_ext.memory_planner import MemoryPlannerConfig
    from megatron_ext.model.attention_config import AttentionConfig

    cfgs = {
        "data": DataConfig.from_args(args),
        "attention": AttentionConfig.from_args(args),
        "gns": GNSConfig.from_args(args),
        "memory": MemoryPlannerConfig.from_args(args),
        "growth": BatchGrowthConfig.from_args(args),
    }
    cfgs["growth"].validate_against(gns_enabled=cfgs["gns"].gns)
    gns = cfgs["gns"]
    if gns.gns:
        if gns.gns_estimator == "data-parallel" and args.data_parallel_size < 2:
            raise ArgumentError("--gns-estimator data-parallel compares per-rank and global "
                                "gradients: it needs data-parallel size >= 2 (more processes, or "
                                "--gns-estimator per-sample)")
        if gns.gns_estimator == "data-parallel" and args.overlap_grad_reduce:
            raise ArgumentError("--gns-estimator data-parallel reads gradients before the DP "
                                "reduction: drop --overlap-grad-reduce")
        if gns.gns_estimator == "per-sample" and args.global_batch_size < 2:
            raise ArgumentError("--gns needs --global-batch-size >= 2 (per-sample estimator)")
        if args.context_parallel_size > 1:
            raise ArgumentError("--gns does not support --context-parallel-size > 1 yet")
        if gns.gns_include_embedding and args.pipeline_model_parallel_size > 1 \
                and not args.untie_embeddings_and_output_weights:
            raise ArgumentError("--gns-include-embedding with tied embeddings needs PP=1: add "
                                "--untie-embeddings-and-output-weights")
        if gns.gns_include_embedding and args.position_embedding_type == "learned_absolute":
            raise ArgumentError("--gns-include-embedding supports --position-embedding-type "
                                "rope only")
    if (args.bf16 or args.fp16) and not torch.cuda.is_available():
        raise ArgumentError("--bf16/--fp16 need a CUDA GPU (megatron-core's mixed-precision "
                            "optimizer is CUDA-only): drop the flag to train in fp32 on CPU")
    if args.attention_backend == "flash":
        from megatron_ext.model.attention import flash_attn_available

        if not (flash_attn_available() and torch.cuda.is_available()):
            raise ArgumentError("--attention-backend flash needs CUDA and `pip install "
                                "flash-attn`; use --attention-backend sdpa (or auto)")
    if args.use_distributed_optimizer and not torch.cuda.is_available():
        raise ArgumentError("--use-distributed-optimizer needs CUDA (megatron-core's "
                            "DistributedOptimizer wraps CUDA tensors only): drop it on CPU")
    if args.context_parallel_size > 1 and args.seq_length % (2 * args.context_parallel_size):
        raise ArgumentError(f"--seq-length {args.seq_length} must be divisible by 2 x "
                            f"--context-parallel-size for the load-balanced causal split")
    if args.context_parallel_size > 1 and args.attention_dropout > 0:
        raise ArgumentError("--context-parallel-size > 1 needs --attention-dropout 0")
    return cfgs


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    # Megatron warns at import about every optional accelerator it does not find; we log
    # which paths actually run instead.
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    default_level = "INFO" if rank == 0 else "WARNING"
    logging.basicConfig(level=os.environ.get("MEGATRON_EXT_LOG_LEVEL", default_level),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        args = parse_args(argv)
        cfgs = _feature_configs(args)
        if args.save and not cfgs["memory"].plan_memory:
            _check_save_dir(args.save)
    except (ArgumentError, ValueError) as e:
        print(f"pretrain_gpt.py: error: {e}", file=sys.stderr)
        return 2
    if cfgs["memory"].plan_memory:
        from megatron_ext.training.memory_report import print_memory_plan

        print_memory_plan(args, cfgs["memory"])
        return 0
    from megatron_ext.training.checkpointing import CheckpointMismatch

    try:
        train(args, cfgs)
    except CheckpointMismatch as e:
        if rank == 0:
            print(f"pretrain_gpt.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingDiverged, OutOfMemory) as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f"rank {rank}: " if world > 1 else ""
        print(f"pretrain_gpt.py: error: {who}{e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def train(args: argparse.Namespace, cfgs: Dict[str, Any]) -> int:
    """Run training; returns the last completed iteration."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.num_microbatches_calculator import reconfigure_num_microbatches_calculator
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.training import checkpointing
    from megatron_ext.training.data_iter import TrainData
    from megatron_ext.training.extensions import build_extensions
    from megatron_ext.training.initialize import initialize_megatron
    from megatron_ext.training.metrics import MetricsLogger, memory_gib, model_flops_per_sample
    from megatron_ext.training.model import build_model, build_transformer_config
    from megatron_ext.model.attention import get_core_attention

    device = initialize_megatron(args)
    stop = _StopRequest()
    config = build_transformer_config(args)
    core_attention, attention_desc = get_core_attention(cfgs["attention"])
    data = TrainData(args, cfgs["data"], device)
    ext = build_extensions(args, cfgs, data.vocab_size)
    gpt, model = build_model(args, config, data.vocab_size, core_attention,
                             linear_classes=ext.linear_classes, norm_class=ext.norm_class)
    config.finalize_model_grads_func = ext.wrap_finalize(finalize_model_grads)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum,
            clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [model],
    )
    ext.attach(model)

    iteration = 0
    last_checkpoint = None
    if args.load:
        last_checkpoint = args.load
        loop_state = checkpointing.load_checkpoint(
            args.load, gpt, optimizer, load_optim=not args.no_load_optim,
            signature=checkpointing.model_signature(args, data.padded_vocab_size))
        iteration = int(loop_state["iteration"])
        data.load_state_dict(loop_state["data"])
        ext.load_state_dict(loop_state["extensions"])

    dp = ps.get_data_parallel_world_size()
    is_log_rank = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                   and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    metrics = MetricsLogger(is_log_rank, args.tensorboard_dir, args.log_json)
    flops_per_sample = model_flops_per_sample(args, data.padded_vocab_size)
    world = torch.distributed.get_world_size()
    n_params = sum(p.numel() for p in gpt.parameters())
    print_rank_0(
        f"> megatron_ext: {device.upper()} ({torch.distributed.get_backend()}), world {world} = "
        f"TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x "
        f"CP {args.context_parallel_size} x DP {dp}; core attention: {attention_desc}; "
        f"optimizer: {_optimizer_impl(optimizer)}; "
        f"parameters on rank 0: {n_params / 1e6:.2f} M; {ext.describe()}"
    )
    print_rank_0(f"> data: {data.description}")

    forward_backward = get_forward_backward_func()
    last_log_time = time.perf_counter()
    current_shape = (args.global_batch_size, args.micro_batch_size)
    while iteration < args.train_iters:
        global_batch, micro = ext.current_batch, ext.current_micro
        if (global_batch, micro) != current_shape:  # a re-plan takes effect at this boundary
            reconfigure_num_microbatches_calculator(
                torch.distributed.get_rank(), None, global_batch, micro, dp)
            current_shape = (global_batch, micro)
        micro_batches = data.next_step(global_batch, micro)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        ext.begin_step(iteration + 1, len(micro_batches), micro, global_batch)
        lr = ext.learning_rate(data.consumed_tokens, global_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        t0 = time.perf_counter()
        try:
            losses = forward_backward(
                forward_step_func=data.forward_step, data_iterator=iter(micro_batches),
                model=[model], num_microbatches=len(micro_batches),
                seq_length=data.local_seq_length, micro_batch_size=micro, forward_only=False,
            )
        except torch.cuda.OutOfMemoryError as e:
            raise _out_of_memory(e, iteration + 1, args, cfgs, data.vocab_size) from None
        except RuntimeError as e:
            if "Unexpected result" not in str(e):
                raise
            raise _diverged(e, iteration + 1, last_checkpoint) from None
        ext.before_optimizer_step()
        try:
            update_ok, grad_norm, _ = optimizer.step()
        except torch.cuda.OutOfMemoryError as e:  # Adam state is allocated at the first step
            raise _out_of_memory(e, iteration + 1, args, cfgs, data.vocab_size) from None
        if device == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        iteration += 1
        data.advance(global_batch)
        loss = data.reduce_loss(losses)
        ext.after_step(iteration, data.consumed_tokens, step_time)
        gns = ext.gns_report(iteration)
        if gns is not None and is_log_rank:
            print(f" gns iteration {iteration:8d} | tokens: {int(gns['gns/tokens']):12d} | "
                  f"B_simple: {gns['gns/b_simple']:.2f} | |G|^2: {gns['gns/grad_sq_norm']:.4E} | "
                  f"tr(Sigma): {gns['gns/trace_sigma']:.4E} | skipped samples: "
                  f"{int(gns['gns/skipped_samples'])}", flush=True)
            metrics.scalars(iteration, gns)
        if iteration % args.log_interval == 0:
            now = time.perf_counter()
            elapsed = (now - last_log_time) / args.log_interval
            last_log_time = now
            tokens_per_s = global_batch * args.seq_length / elapsed
            entry = {
                "consumed_samples": data.consumed_samples, "tokens": data.consumed_tokens,
                "iteration_time_ms": elapsed * 1e3, "lr": lr, "global_batch_size": global_batch,
                "lm_loss": loss if loss is not None else float("nan"),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens_per_s,
                "tflops_per_gpu": flops_per_sample * global_batch / elapsed / world / 1e12,
                "memory_gib": memory_gib(), "update_skipped": float(not update_ok),
            }
            entry.update(ext.metrics())
            metrics.log_iteration(iteration, args.train_iters, entry)
        if args.eval_interval and data.has_valid and iteration % args.eval_interval == 0:
            val = data.evaluate(forward_backward, model, args.eval_iters)
            if is_log_rank and val is not None:
                print(f" validation loss at iteration {iteration}: {val:.6E} | "
                      f"ppl: {math.exp(min(val, 50)):.3f}", flush=True)
                metrics.scalars(iteration, {"valid_lm_loss": val})
        stop_now = stop.agreed(device)
        budget_spent = args.train_samples is not None and data.consumed_samples >= args.train_samples
        exit_now = bool(args.exit_interval) and iteration % args.exit_interval == 0
        save_now = args.save and (
            (args.save_interval and iteration % args.save_interval == 0)
            or iteration == args.train_iters or stop_now or budget_spent or exit_now)
        if save_now:
            state = {"iteration": iteration, "data": data.state_dict(),
                     "extensions": ext.state_dict(),
                     "parallel_layout": checkpointing.parallel_layout(),
                     "model": checkpointing.model_signature(args, data.padded_vocab_size)}
            path = checkpointing.save_checkpoint(args.save, iteration, gpt, optimizer, state,
                                                 save_optim=not args.no_save_optim)
            print_rank_0(f"> saved checkpoint at iteration {iteration} to {path}")
            last_checkpoint = str(path)
        if stop_now:
            print_rank_0(f"> stop requested: exiting after iteration {iteration}")
            break
        if budget_spent:
            break
        if exit_now:
            print_rank_0(f"> --exit-interval {args.exit_interval}: exiting at iteration {iteration}")
            break
    ext.finish(is_log_rank)
    metrics.close()
    return iteration
