"""Import a HuggingFace model into a megatron_ext checkpoint, export one back.

Main API: :func:`import_hf` (HF directory -> ``SAVE/iter_0000000``, returns the path and the
model flags), :func:`export_hf` (checkpoint -> HF directory), :func:`loaded_model` (a context
manager: the product's GPT of a checkpoint, weights loaded by the ``Checkpointer``),
:func:`full_logits`, :func:`require_hf`.

Import reads ``config.json`` and the ``*.safetensors`` files (lazily, tensor by tensor),
derives the model flags (:mod:`megatron_ext.hf.mapping`), builds the GPT the way training does
(``parse_job`` + ``build_gpt``, in this process or under torchrun with any TP/PP layout: every
rank takes its shards, ``training.model.load_weights_by_name``) and saves it with
``dist_checkpointing`` as iteration 0 without optimizer. Its loop state has no train state
(training loads it as ``--finetune``), the model signature and flags, and the original
config (``hf``), which later checkpoints carry on for export. Export loads a checkpoint into
a one-process GPT (megatron-core reshards any saved layout to TP=1/PP=1) and writes
``model.safetensors`` (the tensors HF's ``save_pretrained`` writes; tied output weights left
out) plus ``config.json`` from the checkpoint's model flags.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import asdict, fields
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_ext.config_flags import flag_name
from megatron_ext.hf.mapping import Unsupported, architecture, hf_config, hf_names, model_flags
from megatron_ext.hf.weights import Shape, ignored, to_hf, to_megatron

_INSTALL = "pip install 'megatron_ext[hf]'"
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def require_hf() -> None:
    """Raise :class:`Unsupported` (one line with the install command) without the extras."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise Unsupported(f"HuggingFace conversion needs transformers and safetensors "
                          f"({e}): {_INSTALL}") from None


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _HFWeights:
    """The tensors of a directory's ``*.safetensors`` files, read when asked for."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if not files:
            raise Unsupported(f"--hf-dir {hf_dir}: no *.safetensors files (the converter reads "
                              "safetensors; save_pretrained writes them)")
        self._where = {}
        for path in files:
            handle = safe_open(path, framework="pt")
            self._where.update({key: handle for key in handle.keys()})
        self.used = set()

    def _key(self, name: str) -> str:
        # Files saved from the base model (e.g. the hub's gpt2) lack the "transformer." prefix.
        key = name if name in self._where else name.split(".", 1)[-1]
        if key not in self._where:
            raise Unsupported(f"--hf-dir: the weights have no tensor {name}")
        return key

    def get(self, name: str) -> torch.Tensor:
        key = self._key(name)
        self.used.add(key)
        return self._where[key].get_tensor(key)

    def dtype(self, name: str) -> str:
        """The stored dtype ("bfloat16", ...) from the file's header, without reading it."""
        key = self._key(name)
        code = self._where[key].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code.lower())

    def names(self) -> List[str]:
        return list(self._where)


def read_config(hf_dir: str) -> dict:
    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise Unsupported(f"--hf-dir {hf_dir}: cannot read config.json ({e})") from None
    if not isinstance(config, dict):
        raise Unsupported(f"--hf-dir {hf_dir}: config.json is not a JSON object")
    return config


@contextlib.contextmanager
def megatron_world(job) -> Iterator[str]:
    """``initialize_megatron(job)`` (torchrun's world, or this process alone), torn down and
    the rendezvous variables restored afterwards; yields the device type. torchrun's process
    group stays (gloo cannot rejoin the same rendezvous): only the parallel state goes."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_ext.training.initialize import initialize_megatron

    saved_env = {k: os.environ.get(k) for k in _RENDEZVOUS}
    owns_group = not torch.distributed.is_initialized() and "RANK" not in os.environ
    try:
        yield initialize_megatron(job)
    finally:
        destroy_num_microbatches_calculator()
        ps.destroy_model_parallel()
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.update({k: v for k, v in saved_env.items() if v is not None})
        for k in [k for k, v in saved_env.items() if v is None]:
            os.environ.pop(k, None)


def _shape(job, vocab_size: int, padded: int) -> Shape:
    m = job.model
    return Shape(m.num_attention_heads, m.num_query_groups or m.num_attention_heads,
                 m.kv_channels or m.hidden_size // m.num_attention_heads, vocab_size, padded)


def import_hf(hf_dir: str, save: str, args: Sequence[str] = ()) -> Tuple[str, List[str]]:
    """Write the HF model in ``hf_dir`` as ``save/iter_0000000``; ``args``: more
    ``pretrain_gpt.py`` flags (e.g. ``--tensor-model-parallel-size`` under torchrun).
    Returns (checkpoint path, the model flags to train it with)."""
    from megatron_ext.training import checkpointing
    from megatron_ext.training.checkpoint_dir import CheckpointDir
    from megatron_ext.training.job import parse_job
    from megatron_ext.training.model import (build_gpt, canonical_param_names,
                                             load_weights_by_name, padded_vocab_size)

    require_hf()
    hf = read_config(hf_dir)
    arch, flags = architecture(hf), model_flags(hf)
    if CheckpointDir(save).iterations():
        raise Unsupported(f"--save {save} already holds checkpoints: import into a new directory")
    weights = _HFWeights(hf_dir)
    positions = flags[flags.index("--max-position-embeddings") + 1]
    job = parse_job(flags + ["--seq-length", positions, *args])
    with megatron_world(job):
        padded = padded_vocab_size(hf["vocab_size"], job.model.make_vocab_size_divisible_by, job.tp)
        gpt = build_gpt(job, padded).gpt
        dtype = weights.dtype(hf_names(arch, "embedding.word_embeddings.weight")[0][0])
        load_weights_by_name(gpt, to_megatron(arch, set(canonical_param_names(gpt).values()),
                                              weights.get, _shape(job, hf["vocab_size"], padded)))
        _check_all_used(weights, arch, not job.model.untie_embeddings_and_output_weights)
        loop = {"format_version": checkpointing.FORMAT_VERSION, "model_only": True,
                "origin": f"tools/convert_hf.py import --hf-dir {hf_dir}", "flags": flags,
                "model": checkpointing.model_signature(job.model, padded),
                "model_config": asdict(job.model),
                "parallel_layout": checkpointing.parallel_layout(),
                "hf": {"architecture": arch, "config": hf, "vocab_size": hf["vocab_size"],
                       "dtype": dtype}}
        path = checkpointing.save_checkpoint(CheckpointDir(save), 0, gpt, None, loop,
                                             save_optim=False)
    return path, flags


def _check_all_used(weights: _HFWeights, arch: str, tied: bool) -> None:
    """Every HF tensor went somewhere (on some rank): else the model has parts we drop."""
    used = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(used, weights.used)
    done = set().union(*used) | ({"lm_head.weight"} if tied else set())
    left = [n for n in weights.names() if n not in done and not ignored(arch, n)]
    if left:
        raise Unsupported(f"--hf-dir: {len(left)} tensors have no place in the {arch} model "
                          f"the flags describe (e.g. {', '.join(sorted(left)[:3])})")


def model_argv(values: dict) -> List[str]:
    """The flags that rebuild a ModelConfig from its saved values (``asdict``)."""
    from megatron_ext.training.config import ModelConfig

    argv: List[str] = []
    for f in fields(ModelConfig):
        value = values.get(f.name)
        if value is None or value is False:
            continue
        argv.append(flag_name(f.name))
        if value is not True:
            argv.append(repr(value) if isinstance(value, float) else str(value))
    return argv


class _Announce:
    """The Checkpointer's log outside training: lines from rank 0."""

    @staticmethod
    def announce(line: str) -> None:
        if torch.distributed.get_rank() == 0:
            print(line, flush=True)


@contextlib.contextmanager
def loaded_model(load: str, args: Sequence[str] = ()):
    """Yields ``(job, gpt, loop_state)``: the GPT of checkpoint ``load`` (a --save directory
    or one iter_N) built by ``build_gpt`` from its saved model flags (``args`` add or override
    flags, e.g. the parallel layout under torchrun, or every model flag for a checkpoint that
    did not save them), the weights loaded by the ``Checkpointer`` as for ``--finetune``."""
    from megatron.core import dist_checkpointing

    from megatron_ext.training import checkpointing
    from megatron_ext.training.checkpoint_dir import resolve_load_path
    from megatron_ext.training.checkpointer import Checkpointer
    from megatron_ext.training.job import parse_job
    from megatron_ext.training.model import build_gpt

    path = resolve_load_path(load, None)[0]
    loop = checkpointing.peek_loop_state(path)
    saved = loop.get("model_config")
    if not saved and not args:
        raise Unsupported(f"--load {path} does not record its model flags (e.g. a Megatron-LM "
                          "checkpoint): give them after the command, as to pretrain_gpt.py")
    job = parse_job((model_argv(saved) if saved else []) + list(args)
                    + ["--load", path, "--finetune"])
    padded = int(dist_checkpointing.load_tensors_metadata(path)[
        "embedding.word_embeddings.weight"].global_shape[0])
    if padded % job.tp:
        raise Unsupported(f"--load {path}: its vocabulary of {padded} rows does not split over "
                          f"TP {job.tp}")
    with megatron_world(job):
        gpt = build_gpt(job, padded).gpt
        checkpointer = Checkpointer(job.checkpoint, _Announce())
        checkpointer.signature = checkpointing.model_signature(job.model, padded)
        checkpointer.load_weights(checkpointer.prepare(), gpt)
        yield job, gpt, loop


@torch.no_grad()
def full_logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded vocab] of token ids [b, s] (gathered over TP; PP=1, CP=1)."""
    from megatron.core import parallel_state as ps

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    gpt.eval()
    out = gpt(tokens, positions, None).float()  # [b, s, vocab / TP]
    if ps.get_tensor_model_parallel_world_size() == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, out.contiguous(),
                                 group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def export_hf(load: str, hf_dir: str, args: Sequence[str] = (),
              dtype: Optional[str] = None) -> str:
    """Write checkpoint ``load`` as a HuggingFace model directory ``hf_dir`` (one process);
    ``dtype`` of the tensors defaults to the imported model's (else float32)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from megatron_ext.training.model import canonical_param_names

    require_hf()
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise Unsupported("export runs in one process: python tools/convert_hf.py export ...")
    with loaded_model(load, args) as (job, gpt, loop):
        origin = loop.get("hf") or {}
        padded = gpt.embedding.word_embeddings.weight.shape[0]
        vocab = origin.get("vocab_size") or padded
        arch, config = hf_config(asdict(job.model), vocab, origin.get("config"))
        names = canonical_param_names(gpt)
        ours = {names[n]: p.detach() for n, p in gpt.named_parameters()}
        dtype = dtype or origin.get("dtype") or "float32"
        tensors = to_hf(arch, ours, _shape(job, vocab, padded), getattr(torch, dtype))
    os.makedirs(hf_dir, exist_ok=True)
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    hf.dtype = dtype
    hf.save_pretrained(hf_dir)
    return hf_dir


__all__ = ["import_hf", "export_hf", "loaded_model", "full_logits", "model_argv",
           "megatron_world", "read_config", "require_hf", "Unsupported"]
