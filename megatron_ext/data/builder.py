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

This module imports no Megatron until ``build_gpt_datasets`` runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import struct
from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Tuple

from megatron_ext.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


def parse_blend(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path`` -> (prefixes, weights or None), Megatron's blend syntax.

    ``a b`` -> ([a, b], None) (weighted by size); ``0.3 a 0.7 b`` -> ([a, b], [0.3, 0.7]).
    """
    if len(data_path) % 2 == 0:
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            if any(w <= 0 for w in weights):
                raise ValueError(f"--data-path: blend weights must be > 0, got {weights}")
            return [p.strip() for p in data_path[1::2]], weights
    return [p.strip() for p in data_path], None


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


# Megatron's indexed-dataset dtype codes (megatron.core.datasets.indexed_dataset.DType).
_DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
                7: "float32", 8: "uint16"}


def max_token_id(prefix: str, max_tokens: int = 1 << 20) -> int:
    """Largest id among the first ``max_tokens`` tokens of ``prefix.bin`` (a cheap check that
    the data fits the vocabulary: a too-small one fails later inside the embedding)."""
    import numpy

    code, _ = _idx_header(prefix)
    if code not in _DTYPE_CODES:
        raise ValueError(f"--data-path: {prefix}.idx has unknown token dtype code {code}")
    dtype = numpy.dtype(_DTYPE_CODES[code])
    n = min(max_tokens, os.path.getsize(prefix + ".bin") // dtype.itemsize)
    if n == 0:
        return -1
    return int(numpy.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n,)).max())


def _idx_header(prefix: str) -> Tuple[int, int]:
    """(token dtype code, sequence count) from an ``.idx`` header."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 docs
    if len(header) < 34 or not header.startswith(b"MMIDIDX"):
        raise ValueError(f"--data-path: {prefix}.idx is not a Megatron indexed dataset index")
    return header[17], struct.unpack("<Q", header[18:26])[0]


def indexed_dataset_num_sequences(prefix: str) -> int:
    """Sequence (= document, as our preprocessors write them) count from an ``.idx`` header."""
    return _idx_header(prefix)[1]


@dataclass
class DataConfig:
    """Where training text comes from and how it is split and evaluated."""

    data_path: Optional[List[str]] = None
    """Indexed-dataset prefixes (``PREFIX.bin``/``PREFIX.idx``, made by
    tools/preprocess_data.py), optionally weighted: ``0.7 a 0.3 b``. None: the stdlib corpus."""
    split: str = "969,30,1"
    """Train,valid,test weights of the documents of every prefix."""
    data_cache_path: Optional[str] = None
    """Directory for the default corpus and megatron's sample-index caches (None: the corpus
    goes to ~/.cache/megatron_ext/stdlib_corpus, index caches next to the data)."""
    tokenizer_type: str = "byte"
    """``byte`` (UTF-8 bytes + eod, vocab 257; data from tools/preprocess_data.py) or
    ``NullTokenizer`` (data tokenized elsewhere, e.g. by Megatron-LM's preprocess_data.py with
    a BPE tokenizer; needs ``vocab_size``)."""
    vocab_size: Optional[int] = None
    """NullTokenizer only: ids in the data are < vocab_size; eod is one more id (as in
    Megatron-LM), so the model's vocabulary is vocab_size + 1 before padding."""
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
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type!r} is not supported; use "
                             f"one of {list(TOKENIZER_TYPES)}")
        tokenizer = build_tokenizer(self.tokenizer_type, self.vocab_size)  # flag-pair checks
        if self.tokenizer_type == "NullTokenizer" and self.data_path is None and not self.mock_data:
            raise ValueError("--tokenizer-type NullTokenizer reads pre-tokenized data: give "
                             "--data-path (the default corpus is byte-tokenized)")
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
            prefixes = parse_blend(self.data_path)[0]
            for prefix in prefixes:
                if prefix.endswith((".bin", ".idx")):
                    raise ValueError(f"--data-path {prefix}: pass the prefix without the "
                                     f".bin/.idx suffix, i.e. {prefix[:-4]}")
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(prefix + suffix):
                        raise ValueError(f"--data-path {prefix}: missing file {prefix + suffix}; "
                                         "create it with tools/preprocess_data.py --output-prefix")
            # Vocabulary check on the first 1M tokens of at most ~64 files (spread over the
            # blend): cheap at startup even for blends of thousands of shards.
            limit = tokenizer.vocab_size
            for prefix in prefixes[::max(1, len(prefixes) // 32)]:
                top = max_token_id(prefix)
                if top >= limit:
                    hint = ("raise --vocab-size" if self.tokenizer_type == "NullTokenizer" else
                            "it was not made by tools/preprocess_data.py: use --tokenizer-type "
                            "NullTokenizer --vocab-size N")
                    raise ValueError(f"--data-path {prefix}: token id {top} does not fit the "
                                     f"vocabulary of {limit} ({self.tokenizer_type}); {hint}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        """Build from parsed ``add_data_args`` flags (``--foo-bar`` -> ``foo_bar``)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "data" argument group; flags map 1:1 to :class:`DataConfig` fields."""
    d = DataConfig
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=d.data_path, metavar="[WEIGHT] PREFIX",
                   help="indexed dataset prefix(es) from tools/preprocess_data.py, optionally "
                        "weighted: '0.7 a 0.3 b'; default: the Python stdlib corpus (no download)")
    g.add_argument("--split", default=d.split, help="train,valid,test document weights (default: %(default)s)")
    g.add_argument("--data-cache-path", default=d.data_cache_path,
                   help="directory for the default corpus and sample-index caches")
    g.add_argument("--tokenizer-type", default=d.tokenizer_type, choices=TOKENIZER_TYPES,
                   help="tokenizer (default: %(default)s); NullTokenizer for data tokenized "
                        "elsewhere, with --vocab-size")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="NullTokenizer: the data's ids are < N (eod = N, as in Megatron-LM)")
    g.add_argument("--mock-data", action="store_true", help="synthetic data (megatron MockGPTDataset)")
    g.add_argument("--default-corpus-mb", type=float, default=d.default_corpus_mb,
                   help="without --data-path: MB of Python stdlib sources to train on "
                        "(default: %(default)s; all of it is ~12)")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters,
                   help="validation steps per evaluation, 0 disables (default: %(default)s)")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="evaluate every N steps (default: %(default)s)")
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

    tokenizer = build_tokenizer(config.tokenizer_type, config.vocab_size)
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
    keep = list(keep)
    for prefix in prefixes:
        n = indexed_dataset_num_sequences(prefix)
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
