"""Save and resume training state with megatron-core ``dist_checkpointing``.

Main API: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`load_model`,
:func:`peek_loop_state`, :func:`is_model_only`, :func:`start_checkpoint_writer`,
:func:`model_signature`, :data:`FORMAT_VERSION` (what
:class:`Checkpointer` in ``checkpointer.py`` puts into a checkpoint besides the shards).
Which checkpoints exist and are complete is ``checkpoint_dir.py``'s business.

Layout of ``--save DIR``::

    DIR/iter_0000040/                  dist_checkpointing directory (model + optimizer shards,
                                       common.pt with the loop's replicated state)
    DIR/iter_0000040/rank_00003.pt     this rank's RNG states (differ per TP/PP rank)
    DIR/iter_0000040/manifest.json     every file's size, written last (completeness)
    DIR/latest_checkpointed_iteration.txt

A checkpoint saved under one TP/PP/DP layout resumes under another (megatron-core reshards
the model and optimizer); only the dropout RNG streams then restart. The model-shape flags are
saved too (:func:`model_signature`): resuming with different ones fails before any shard is
read, naming each flag (:class:`CheckpointMismatch`).

A checkpoint is written to ``iter_N.tmp``, gets its manifest when every rank has finished,
and is renamed; a save that fails on any rank (a full disk) is removed on every rank and
raises :class:`SaveFailed`, so a crash while saving never leaves a half-written checkpoint
behind as the one to resume from.

The loop's state (``common.pt``'s ``loop`` entry) carries ``format_version``. Version 1
(written before the train state owned the progress: no version key) is upgraded on load, so
those checkpoints resume with the same sample stream and schedule; a version this code does
not know stops with one line naming it.

A checkpoint that holds only a model (no ``loop`` entry, as Megatron-LM's ``dist_checkpointing``
save of a GPTModel; or a loop state without a train state, as ``tools/convert_hf.py import``
writes) is loaded with finetune semantics (:func:`load_model`: weights only). Its padded
vocabulary is then read from the embedding's shape. The norms' keys follow megatron-core's
layer specs (``layer_spec.SHARDED_STATE_DICT_KEYS_MAP``); checkpoints saved before that keep
the module names, which loading detects in the checkpoint's metadata.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from typing import Any, Dict, Optional

import torch

from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_ext.model.layer_spec import unfused_norm_key
from megatron_ext.training import dist_opt_checkpoint as dist_opt
from megatron_ext.training.checkpoint_dir import CheckpointDir
from megatron_ext.training.errors import CheckpointMismatch, JobError

logger = logging.getLogger(__name__)

# Flags that fix the parameters' shapes: saved with every checkpoint and compared on --load,
# so a mismatch is named flag by flag instead of as a tensor-shape error from the loader.
MODEL_SHAPE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "swiglu", "normalization", "qk_layernorm", "disable_bias_linear",
    "position_embedding_type", "untie_embeddings_and_output_weights", "max_position_embeddings",
    "padded_vocab_size",
)


#: Version of the loop state this code writes (see :func:`upgrade_loop_state`).
FORMAT_VERSION = 2


class SaveFailed(JobError):
    """A checkpoint could not be written on some rank (nothing of it is left behind)."""


def model_signature(model_config, padded_vocab_size: int) -> Dict[str, Any]:
    """The values of :data:`MODEL_SHAPE_FLAGS` for this run (from its ModelConfig)."""
    sig = {k: getattr(model_config, k, None) for k in MODEL_SHAPE_FLAGS
           if k != "padded_vocab_size"}
    sig["padded_vocab_size"] = int(padded_vocab_size)
    if sig.get("position_embedding_type") != "learned_absolute":
        sig.pop("max_position_embeddings")  # only learned positions have a table
    return sig


def padded_vocab_to_use(saved: Dict[str, Any], shape, tp: int, log) -> int:
    """The padded vocabulary of the model to build: the checkpoint's when resuming under
    another TP size (its rows are the trained ones; Megatron pads to a multiple of
    --make-vocab-size-divisible-by x TP, so TP 1 -> 2 would otherwise change it), as long as
    the new TP splits it evenly."""
    mine = shape.padded_vocab(tp)
    theirs = (saved.get("model") or {}).get("padded_vocab_size") or saved.get("padded_vocab_size")
    if not theirs or theirs == mine:
        return mine
    if theirs % tp or theirs < shape.vocab_size:
        raise CheckpointMismatch(
            f"--load: the checkpoint's padded vocabulary {theirs} cannot be split over "
            f"--tensor-model-parallel-size {tp} (--make-vocab-size-divisible-by "
            f"{shape.make_vocab_size_divisible_by} x TP {tp} would pad to {mine}): resume with "
            f"a TP size that divides {theirs}")
    log.announce(f"keeping the checkpoint's padded vocabulary {theirs} (TP {tp} with "
                 f"--make-vocab-size-divisible-by {shape.make_vocab_size_divisible_by} "
                 f"would pad to {mine})")
    return theirs


def _check_model_signature(ckpt_dir: str, saved: Optional[Dict[str, Any]],
                           current: Optional[Dict[str, Any]]) -> None:
    if not saved or not current:
        return  # checkpoints written before signatures were saved
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        def name(k):  # the padded vocab is not a flag: say what sets it
            return ("padded vocab (--make-vocab-size-divisible-by x TP)"
                    if k == "padded_vocab_size" else "--" + k.replace("_", "-"))
        what = ", ".join(f"{name(k)} {saved.get(k)} (this run: {current.get(k)})"
                         for k in diffs)
        raise CheckpointMismatch(f"--load {ckpt_dir} was saved for another model: {what}; "
                                 "use the saved run's model flags")


def upgrade_loop_state(loop: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The loop state in the current format (version 1 is converted, others refused).

    Version 1 kept the progress in three places (``iteration``; the sampler's and the data's
    ``consumed_samples``; the extensions' ``current_batch``/``current_micro``); version 2
    has one ``train_state`` and one entry per component.
    """
    version = loop.get("format_version", 1)
    if version == FORMAT_VERSION:
        return loop
    if version != 1:
        raise CheckpointMismatch(
            f"--load {where}: checkpoint format version {version} is not one this megatron_ext "
            f"reads (1 to {FORMAT_VERSION}); resume it with the release that wrote it")
    ext = loop.get("extensions") or {}
    data = loop["data"]
    components = {}
    if ext.get("gns") is not None:
        components["gns"] = ext["gns"]
    if ext.get("controller") is not None:
        components["batch_growth"] = {"controller": ext["controller"],
                                      "lr_scaler": ext["lr_scaler"]}
    return {
        "format_version": FORMAT_VERSION,
        "train_state": {"iteration": loop["iteration"],
                        "consumed_samples": data["consumed_samples"],
                        "global_batch_size": ext["current_batch"],
                        "micro_batch_size": ext["current_micro"]},
        "data": {"total_samples": data["sampler"]["total_samples"]},
        "components": components,
        "parallel_layout": loop.get("parallel_layout"),
        "model": loop.get("model"),
    }


def start_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint-writer helper now, immune to stop signals.

    megatron-core's filesystem writer keeps one helper process (a spawned multiprocessing
    manager, created at its first save) for every later save. Schedulers stop a job by
    signalling each worker's whole process group (torchrun, and so SLURM and Kubernetes
    through it), which would kill that helper and make the stop-save fail with a
    BrokenPipeError. A spawned process keeps ignoring the signals its parent ignored, so the
    helper is created here, before training, with SIGTERM/SIGINT/SIGUSR1 ignored; the worker
    itself handles them (save at the step boundary, then exit).
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # another writer: nothing to protect
        return
    create = getattr(filesystem_async, "_get_write_results_queue", None)
    if create is None:
        return
    stop = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in stop}
    try:
        create()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _rng_state() -> Dict[str, Any]:
    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _match_saved_keys(model_sd: Dict[str, Any], ckpt_dir: str) -> None:
    """Load the norms from the keys a checkpoint written without the keys map used."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(ckpt_dir).keys()
    for sharded in nested_values(model_sd):
        key = getattr(sharded, "key", None)
        if key is not None and key not in saved and unfused_norm_key(key) in saved:
            sharded.key = unfused_norm_key(key)


def _sharded_state(model, optimizer, include_optim: bool,
                   load_from: Optional[str] = None) -> Dict[str, Any]:
    model_sd = model.sharded_state_dict()
    is_loading = load_from is not None
    if is_loading:
        _match_saved_keys(model_sd, load_from)  # before the optimizer's keys derive from them
    state = {"model": model_sd}
    if include_optim:
        if is_loading:
            dist_opt.check_optimizer_kind(optimizer, load_from)
            dist_opt.allocate_state(optimizer)
        # The distributed optimizer's state in model space (one tensor per parameter), so a
        # checkpoint resumes under any DP layout and any number of optimizer instances
        # (--dp-reduction flat/hierarchical); 0.16.1's default format is refused by its own
        # dist_checkpointing ("flattened_range is not supported").
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dist_opt.METADATA)
    return state


def _all_ranks_ok(ok: bool) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int32,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _write_shards(tmp_dir: str, model, optimizer, loop_state, save_optim: bool) -> None:
    """Every rank: megatron-core's shards (common.pt from rank 0) and this rank's RNG."""
    state = _sharded_state(model, optimizer, save_optim)
    state["loop"] = loop_state  # non-tensor entries go to common.pt (written by rank 0)
    dist_checkpointing.save(state, tmp_dir)
    rank = torch.distributed.get_rank()
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rank_{rank:05d}.pt"))


def _publish(cdir: CheckpointDir, tmp_dir: str, iteration: int) -> None:
    """Rank 0, after every rank wrote: manifest last, then rename, then the marker."""
    final_dir = cdir.iteration_dir(iteration)
    cdir.write_manifest(tmp_dir, iteration, torch.distributed.get_world_size())
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    cdir.mark_latest(iteration)


def _failure(e: BaseException) -> str:
    """The gist of an exception in one line (the innermost message of a wrapped one)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[-300:]


def _free_space(root: str) -> str:
    """", N GiB free there": the usual cause of a failed save, whatever the writer said."""
    try:
        return f", {shutil.disk_usage(root).free / 2**30:.2f} GiB free there"
    except OSError:
        return ""


def _attempt(action) -> Optional[str]:
    """Run ``action``; what went wrong (a full disk surfaces as OSError, or as torch's
    CheckpointException, a BaseException, around the writer's error), or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        action()
        return None
    except (Exception, CheckpointException) as e:
        return _failure(e)


def save_checkpoint(cdir: CheckpointDir, iteration: int, model, optimizer,
                    loop_state: Dict[str, Any], save_optim: bool = True) -> str:
    """Save model/optimizer shards plus ``loop_state`` (identical on every rank) as
    ``iter_N``; collective. Raises :class:`SaveFailed` on every rank if any rank failed."""
    rank = torch.distributed.get_rank()
    tmp_dir = cdir.iteration_dir(iteration) + ".tmp"

    def agree(error: Optional[str]) -> None:
        if _all_ranks_ok(error is None):
            return
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise SaveFailed(f"saving iteration {iteration} to {cdir.root} failed"
                         f"{f' ({error})' if error else ' on another rank'}; nothing of it "
                         f"was kept{_free_space(cdir.root)}")

    def fresh_tmp_dir():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)

    agree(_attempt(fresh_tmp_dir) if rank == 0 else None)
    agree(_attempt(lambda: _write_shards(tmp_dir, model, optimizer, loop_state, save_optim)))
    agree(_attempt(lambda: _publish(cdir, tmp_dir, iteration)) if rank == 0 else None)
    return cdir.iteration_dir(iteration)


def _model_only_state(ckpt_dir: str) -> Dict[str, Any]:
    """The loop state of a checkpoint without one (a bare model, e.g. Megatron-LM's)."""
    embedding = dist_checkpointing.load_tensors_metadata(ckpt_dir).get(
        "embedding.word_embeddings.weight")
    return {"format_version": FORMAT_VERSION, "model_only": True, "model": None,
            "padded_vocab_size": None if embedding is None else int(embedding.global_shape[0])}


def peek_loop_state(ckpt_dir: str) -> Dict[str, Any]:
    """The loop state of a checkpoint (current format) without loading any shard."""
    try:
        loop = dist_checkpointing.load_common_state_dict(ckpt_dir).get("loop")
        if loop is None:
            return _model_only_state(ckpt_dir)
    except Exception as e:  # a damaged common.pt: one line, not megatron's trace
        raise CheckpointMismatch(f"--load {ckpt_dir}: cannot read its loop state "
                                 f"({_failure(e)})") from None
    return upgrade_loop_state(loop, ckpt_dir)


def is_model_only(loop_state: Dict[str, Any]) -> bool:
    """True for a checkpoint that holds a model but no training state (load it as finetune)."""
    return "train_state" not in loop_state


def _load_shards(ckpt_dir: str, model, optimizer, load_optim: bool) -> None:
    state = _sharded_state(model, optimizer, load_optim, load_from=ckpt_dir)
    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except Exception as e:  # dist_checkpointing wraps shape/key errors in several types
        if "mismatch" not in str(e).lower() and "missing" not in str(e).lower():
            raise
        reason = str(e).strip().splitlines()[-1][:300]
        raise CheckpointMismatch(f"--load {ckpt_dir} does not fit this model or optimizer "
                                 f"({reason})") from None
    model.load_state_dict(loaded["model"])
    if load_optim:
        dist_opt.load_optimizer_state(optimizer, loaded["optimizer"])


def load_model(ckpt_dir: str, model, signature: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load only the model weights of ``ckpt_dir`` (finetune: no optimizer, RNG or progress);
    returns the loop state. ``signature`` as in :func:`load_checkpoint`."""
    loop_state = peek_loop_state(ckpt_dir)
    _check_model_signature(ckpt_dir, loop_state.get("model"), signature)
    _load_shards(ckpt_dir, model, None, load_optim=False)
    return loop_state


def load_checkpoint(ckpt_dir: str, model, optimizer, load_optim: bool = True,
                    signature: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the checkpoint in ``ckpt_dir`` into model/optimizer; returns the loop state.

    ``signature`` (see :func:`model_signature`) is compared with the saved one first and a
    difference raises :class:`CheckpointMismatch` naming the flags.
    """
    rank = torch.distributed.get_rank()
    rank_file = os.path.join(ckpt_dir, f"rank_{rank:05d}.pt")
    loop_state = peek_loop_state(ckpt_dir)
    _check_model_signature(ckpt_dir, loop_state.get("model"), signature)
    _load_shards(ckpt_dir, model, optimizer, load_optim)
    saved_layout = loop_state.get("parallel_layout")
    if os.path.exists(rank_file) and saved_layout in (None, parallel_layout()):
        _set_rng_state(torch.load(rank_file, weights_only=False))
    elif rank == 0:
        # dist_checkpointing reshards model and optimizer across TP/PP/DP layouts; only the
        # per-rank RNG streams (dropout) cannot be carried over to a different layout.
        logger.warning("resuming %s with parallel layout %s (saved: %s): weights and optimizer "
                       "are resharded, dropout RNG streams restart", ckpt_dir,
                       parallel_layout(), saved_layout)
    logger.info("resumed from %s", ckpt_dir)
    return loop_state


def parallel_layout() -> Dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }
