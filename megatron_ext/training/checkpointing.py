"""Save and resume training state with megatron-core ``dist_checkpointing``.

Main API: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`latest_iteration`,
:func:`model_signature`, :data:`FORMAT_VERSION` (what :class:`Checkpointer` in
``checkpointer.py`` puts into a checkpoint besides the shards).

Layout of ``--save DIR``::

    DIR/iter_0000040/                  dist_checkpointing directory (model + optimizer shards,
                                       common.pt with the loop's replicated state)
    DIR/iter_0000040/rank_00003.pt     this rank's RNG states (differ per TP/PP rank)
    DIR/latest_checkpointed_iteration.txt

A checkpoint saved under one TP/PP/DP layout resumes under another (megatron-core reshards
the model and optimizer); only the dropout RNG streams then restart. The model-shape flags are
saved too (:func:`model_signature`): resuming with different ones fails before any shard is
read, naming each flag (:class:`CheckpointMismatch`).

A checkpoint is written to ``iter_N.tmp`` and renamed when every rank has finished, and the
"latest" file is replaced atomically afterwards, so a crash while saving never leaves a
half-written checkpoint behind as the one to resume from.

The loop's state (``common.pt``'s ``loop`` entry) carries ``format_version``. Version 1
(written before the train state owned the progress: no version key) is upgraded on load, so
those checkpoints resume with the same sample stream and schedule; a version this code does
not know stops with one line naming it.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch

from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"

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


class CheckpointMismatch(ValueError):
    """The checkpoint under --load does not fit this run (model, optimizer or format)."""


def model_signature(model_config, padded_vocab_size: int) -> Dict[str, Any]:
    """The values of :data:`MODEL_SHAPE_FLAGS` for this run (from its ModelConfig)."""
    sig = {k: getattr(model_config, k, None) for k in MODEL_SHAPE_FLAGS
           if k != "padded_vocab_size"}
    sig["padded_vocab_size"] = int(padded_vocab_size)
    if sig.get("position_embedding_type") != "learned_absolute":
        sig.pop("max_position_embeddings")  # only learned positions have a table
    return sig


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


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


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


def _sharded_state(model, optimizer, include_optim: bool, is_loading: bool) -> Dict[str, Any]:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if include_optim:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def save_checkpoint(
    root: str,
    iteration: int,
    model,
    optimizer,
    loop_state: Dict[str, Any],
    save_optim: bool = True,
) -> str:
    """Save model/optimizer shards plus ``loop_state`` (identical on every rank)."""
    rank = torch.distributed.get_rank()
    final_dir = _iter_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, save_optim, is_loading=False)
    state["loop"] = loop_state  # non-tensor entries go to common.pt (written by rank 0)
    dist_checkpointing.save(state, tmp_dir)
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rank_{rank:05d}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        tmp_latest = os.path.join(root, LATEST_FILE + ".tmp")
        with open(tmp_latest, "w") as f:
            f.write(str(iteration))
        os.replace(tmp_latest, os.path.join(root, LATEST_FILE))
    torch.distributed.barrier()
    return final_dir


def load_checkpoint(root: str, model, optimizer, load_optim: bool = True,
                    signature: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the latest checkpoint under ``root`` into model/optimizer; returns the loop state.

    ``signature`` (see :func:`model_signature`) is compared with the saved one first and a
    difference raises :class:`CheckpointMismatch` naming the flags.
    """
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(
            f"--load {root}: no {LATEST_FILE} there; point --load at a --save directory"
        )
    ckpt_dir = _iter_dir(root, iteration)
    rank = torch.distributed.get_rank()
    rank_file = os.path.join(ckpt_dir, f"rank_{rank:05d}.pt")
    common = upgrade_loop_state(dist_checkpointing.load_common_state_dict(ckpt_dir)["loop"],
                                ckpt_dir)
    _check_model_signature(ckpt_dir, common.get("model"), signature)
    state = _sharded_state(model, optimizer, load_optim, is_loading=True)
    state["loop"] = None
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
        optimizer.load_state_dict(loaded["optimizer"])
    loop_state = common  # the replicated loop state, already upgraded
    saved_layout = loop_state.get("parallel_layout")
    if os.path.exists(rank_file) and saved_layout in (None, parallel_layout()):
        _set_rng_state(torch.load(rank_file, weights_only=False))
    elif rank == 0:
        # dist_checkpointing reshards model and optimizer across TP/PP/DP layouts; only the
        # per-rank RNG streams (dropout) cannot be carried over to a different layout.
        logger.warning("resuming %s with parallel layout %s (saved: %s): weights and optimizer "
                       "are resharded, dropout RNG streams restart", ckpt_dir,
                       parallel_layout(), saved_layout)
    logger.info("resumed from %s (iteration %d)", ckpt_dir, iteration)
    return loop_state


def parallel_layout() -> Dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }
