"""GPT train/valid/test datasets from flags: ``DataConfig``, ``add_data_args``, ``build_gpt_datasets``.

``build_gpt_datasets`` wraps megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``
(or ``MockGPTDataset`` with ``--mock-data``; or, with no ``--data-path``, the zero-download
stdlib corpus of :mod:`megatron_ext.data.default_corpus`). Megatron's builder handles ranks
itself: when torch.distributed is initialised, rank 0 builds and caches the sample indices, a
barrier follows, then the other ranks load them; without torch.distributed it just builds, so
tests need no process group. Samples are dicts of ``tokens`` [s] and ``labels`` [s] (the same
text shifted by one), ``loss_mask`` [s] float and ``position_ids`` [s]; no ``attention_mask``
unless asked, since the model's causal attention builds its own mask and an [s, s] mask per
sample is wasteful at long context.

``--data-path`` is parsed by megatron-core's ``get_blend_from_list`` (:func:`parse_blend`) and
checked at startup, every prefix's ``.idx`` against its ``.bin`` (:mod:`megatron_ext.data.indexed`).
This module imports no Megatron until a ``--data-path`` is checked or datasets are built.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from megatron_ext.config_flags import FlagConfig, add_config_args
from megatron_ext.data.tokenizer import (TIKTOKEN_PATTERNS, TOKENIZER_FIELDS, TOKENIZER_TYPES,
                                         build_tokenizer)

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


def parse_blend(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path`` -> megatron's blend ``(prefixes, weights or None)``.

    megatron-core's ``get_blend_from_list`` parses it: ``a b`` -> ([a, b], None) (weighted by
    size), ``0.3 a 0.7 b`` -> ([a, b], [0.3, 0.7]). Checked here as well, since megatron asserts
    (or reads a weight as a prefix) when only some pairs start with a number, and takes any weight.
    """
    from megatron.core.datasets.utils import get_blend_from_list

    if not data_path:
        raise ValueError("--data-path needs at least one PREFIX; leave the flag out to train on "
                         "the default corpus")
    numbers = [_is_number(x) for x in data_path[0::2]]
    if len(data_path) % 2 == 0 and any(numbers) and not all(numbers):
        raise ValueError(f"--data-path {' '.join(data_path)}: mixes weighted and unweighted "
                         "prefixes; weight every prefix ('0.3 a 0.7 b') or none ('a b')")
    prefixes, weights = get_blend_from_list(list(data_path))
    if weights is not None and not all(0 < w < math.inf for w in weights):
        raise ValueError(f"--data-path: blend weights must be > 0 (and finite), got {weights}; "
                         "drop a prefix instead of weighting it 0")
    return prefixes, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_data_path(data_path: List[str], vocab_size: int, tokenizer_type: str) -> None:
    """Startup checks of ``--data-path``: blend syntax; that every prefix's ``.idx`` is sane and
    describes exactly its ``.bin`` (:func:`~megatron_ext.data.indexed.check_indexed_dataset`);
    and that the first 1M token ids of at most ~64 of its files (spread over the blend) are
    < ``vocab_size``."""
    from megatron_ext.data.indexed import check_indexed_dataset, max_token_id

    prefixes = parse_blend(data_path)[0]
    # Header + mmap'd length array per prefix (no .bin read), so even blends of thousands of
    # shards are all checked: a damaged one would otherwise crash or train on wrong tokens
    # mid-run. A prefix repeated in the blend is checked once.
    for prefix in dict.fromkeys(prefixes):
        check_indexed_dataset(prefix)
    # The token read is capped, so this stays cheap at startup too.
    for prefix in prefixes[::max(1, len(prefixes) // 32)]:
        top = max_token_id(prefix)
        if top >= vocab_size:
            hint = ("raise --vocab-size" if tokenizer_type == "NullTokenizer" else
                    "it was not made by tools/preprocess_data.py with this tokenizer: "
                    "preprocess it with the same tokenizer flags, or, for data tokenized "
                    "elsewhere, use --tokenizer-type NullTokenizer --vocab-size N")
            raise ValueError(f"--data-path {prefix}: token id {top} does not fit the "
                             f"vocabulary of {vocab_size} ({tokenizer_type}); {hint}")


def parse_split(split: str) -> List[float]:
    """``"969,30,1"`` -> normalised [train, valid, test] fractions (missing ones are 0)."""
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to 3 comma-separated numbers, "
                         "e.g. 969,30,1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected 1 to 3 non-negative weights with a "
                         "positive sum, e.g. 969,30,1")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


@dataclass
class DataConfig(FlagConfig):
    """Where training text comes from and how it is split and evaluated."""

    flag_group = "data"

    data_path: Optional[List[str]] = field(default=None, metadata={"argparse": {
        "metavar": "[WEIGHT] PREFIX"}})
    """Indexed-dataset prefixes (``PREFIX.bin``/``PREFIX.idx``, made by
    tools/preprocess_data.py), optionally weighted: ``0.7 a 0.3 b``. None: the stdlib corpus."""
    split: str = "969,30,1"
    """Train,valid,test weights of the documents of every prefix."""
    data_cache_path: Optional[str] = None
    """Directory for the default corpus and megatron's sample-index caches (None: the corpus
    goes to ~/.cache/megatron_ext/stdlib_corpus, index caches next to the data)."""
    tokenizer_type: str = field(default="byte", metadata={"argparse": {
        "choices": TOKENIZER_TYPES}})
    """Tokenizer of the data: byte (the default corpus's), GPT2BPETokenizer (--vocab-file,
    --merge-file), HuggingFaceTokenizer, SentencePieceTokenizer, TikTokenizer
    (--tokenizer-model) or NullTokenizer (data tokenized elsewhere, --vocab-size). ``byte`` is
    UTF-8 bytes + eod (vocab 257); the four named as in Megatron-LM read local files and their
    data comes from tools/preprocess_data.py with the same flags; ``NullTokenizer`` reads ids
    as they are (e.g. data made by Megatron-LM's preprocess_data.py)."""
    tokenizer_model: Optional[str] = None
    """Local tokenizer file: a HuggingFace tokenizer directory (or its tokenizer.json), a
    SentencePiece .model, or a tiktoken vocabulary JSON (Megatron-LM's format). Nothing is
    downloaded: hub names are refused."""
    vocab_file: Optional[str] = None
    """GPT2BPETokenizer: GPT-2's vocab.json (local file)."""
    merge_file: Optional[str] = None
    """GPT2BPETokenizer: GPT-2's merges.txt (local file)."""
    vocab_size: Optional[int] = None
    """NullTokenizer: the data's ids are < vocab_size (eod is one more id); TikTokenizer: cut
    the vocabulary to this size. NullTokenizer's eod is one more id, as in Megatron-LM, so the
    model's vocabulary is vocab_size + 1 before padding; TikTokenizer's default is the whole
    file plus its special tokens."""
    tiktoken_pattern: str = field(default="v2", metadata={"argparse": {
        "choices": TIKTOKEN_PATTERNS}})
    """TikTokenizer: Megatron-LM's pre-tokenisation regex, v1 or v2."""
    tiktoken_num_special_tokens: int = 1000
    """TikTokenizer: special-token ids reserved below the file's tokens (Megatron-LM's 1000)."""
    mock_data: bool = False
    """Use megatron's synthetic MockGPTDataset instead of real text (for benchmarking)."""
    default_corpus_mb: float = 4.0
    """Without --data-path: size cap of the Python-stdlib corpus in MB (= byte tokens); the
    whole stdlib is ~12 MB. Each size is built once and cached separately."""
    eval_iters: int = 10
    """Validation steps per evaluation (0 disables evaluation)."""
    eval_interval: int = 100
    """Evaluate every this many training steps."""

    def __post_init__(self) -> None:
        # Flag pairs, local files, libraries; reads the tokenizer (cached per process).
        tokenizer = build_tokenizer(self)
        if self.tokenizer_type != "byte" and self.data_path is None and not self.mock_data:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type} reads data tokenized with "
                             "it: give --data-path (the default corpus is byte-tokenized; "
                             "make one with tools/preprocess_data.py and the same flags)")
        parse_split(self.split)
        if not self.default_corpus_mb > 0:
            raise ValueError(f"--default-corpus-mb must be > 0 (MB of stdlib sources), got "
                             f"{self.default_corpus_mb}")
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters must be >= 0 (0 disables evaluation), got {self.eval_iters}")
        if self.eval_interval <= 0:
            raise ValueError(f"--eval-interval must be > 0, got {self.eval_interval}")
        if self.data_path is not None and len(self.data_path) == 0:
            self.data_path = None
        if self.data_path is not None:
            if self.mock_data:
                raise ValueError("--mock-data and --data-path exclude each other; drop one")
            check_data_path(self.data_path, tokenizer.vocab_size, self.tokenizer_type)


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "data" argparse group; flags map 1:1 to :class:`DataConfig` fields."""
    return DataConfig.add_args(parser)


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add only :class:`DataConfig`'s tokenizer flags (``TOKENIZER_FIELDS``), as a "tokenizer"
    group: tools/preprocess_data.py takes the same flags as training."""
    skip = [f.name for f in dataclasses.fields(DataConfig) if f.name not in TOKENIZER_FIELDS]
    group = add_config_args(parser, DataConfig, "tokenizer", skip)
    group.description = "Which tokenizer, read from which local files (nothing is downloaded)."
    return parser


def default_corpus_prefix(config: DataConfig, max_bytes: int = 4_000_000) -> str:
    """Build (or reuse) the stdlib corpus where ``config`` says and return its prefix."""
    from megatron_ext.data.default_corpus import build_default_corpus

    cache_dir = (os.path.join(config.data_cache_path, "stdlib_corpus")
                 if config.data_cache_path else None)
    return build_default_corpus(cache_dir, max_bytes)


def build_gpt_datasets(config: DataConfig, seq_length: int, seed: int, train_samples: int,
                       valid_samples: int, test_samples: int, *, create_attention_mask: bool = False,
                       is_built_on_rank: Optional[Callable[[], bool]] = None,
                       default_corpus_max_bytes: Optional[int] = None) -> tuple:
    """Return ``(train_ds, valid_ds, test_ds)``; call it on every rank.

    Each dataset has at least the requested number of samples (a single-prefix GPTDataset
    rounds up to whole passes over its documents; a weighted blend has exactly that many).
    A split is None when 0 samples are requested for it, or, for valid/test only, when
    ``--split`` leaves it no document (logged as a warning). ``is_built_on_rank`` defaults to
    every rank building (reading rank 0's cached indices).
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    sizes = [int(train_samples), int(valid_samples), int(test_samples)]
    if any(s < 0 for s in sizes) or sizes[0] == 0:
        raise ValueError(f"need train_samples > 0 and valid/test samples >= 0, got {sizes}")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    tokenizer = build_tokenizer(config)
    if config.mock_data:
        blend, split, cls = None, None, MockGPTDataset
    else:
        if default_corpus_max_bytes is None:
            default_corpus_max_bytes = int(config.default_corpus_mb * 1e6)
        data_path = config.data_path or [default_corpus_prefix(config, default_corpus_max_bytes)]
        blend, split, cls = parse_blend(data_path), config.split, GPTDataset
    gpt_config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=split,
        path_to_cache=config.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=create_attention_mask)
    keep = [s > 0 for s in sizes]
    if not config.mock_data:
        keep = _check_split_has_documents(blend[0], gpt_config.split_matrix, keep)
    # Drop unwanted splits without moving the train/valid/test document boundaries.
    gpt_config.split_matrix = [m if k else None for m, k in zip(gpt_config.split_matrix, keep)]
    datasets = BlendedMegatronDatasetBuilder(
        cls, [s if k else 0 for s, k in zip(sizes, keep)],
        is_built_on_rank or (lambda: True), gpt_config).build()
    return tuple(datasets)


def _check_split_has_documents(prefixes: List[str], split_matrix: list, keep: List[bool]) -> List[bool]:
    """Megatron loops forever on a split with samples but no document; catch that here."""
    from megatron_ext.data.indexed import num_sequences

    keep = list(keep)
    for prefix in prefixes:
        n = num_sequences(prefix)
        for i, name in enumerate(SPLIT_NAMES):
            if not keep[i]:
                continue
            bounds = split_matrix[i]
            # Same rounding as megatron's _build_megatron_dataset_splits.
            docs = 0 if bounds is None else (
                int(round(bounds[1] * float(n))) - int(round(bounds[0] * float(n))))
            if docs <= 0:
                msg = (f"--split gives the {name} split 0 of the {n} documents of {prefix}; "
                       "raise its weight in --split or add documents")
                if i == 0:
                    raise ValueError(msg)
                logger.warning("%s; no %s dataset is built", msg, name)
                keep[i] = False
    return keep
