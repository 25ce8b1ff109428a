"""Data pipeline: tokenizers (byte, GPT-2 BPE, HuggingFace, SentencePiece, tiktoken, null),
preprocessing to Megatron indexed datasets, the zero-download stdlib corpus, dataset building
and exact global-batch sampling.

Main API: ``build_tokenizer(data_config)`` (``ByteTokenizer``, ``TokenizerArgs``),
``DataConfig``/``add_data_args``/``build_gpt_datasets``,
``build_default_corpus``, ``GlobalBatchSampler`` (stateless: a step's indices from the
consumed-sample count) and ``collate_micro_batch``; CLI ``tools/preprocess_data.py``
(``megatron_ext.data.preprocess.main``). Importing this package does not import Megatron;
checking a ``--data-path`` or building datasets does.
"""
from megatron_ext.data.builder import DataConfig, add_data_args, build_gpt_datasets
from megatron_ext.data.default_corpus import build_default_corpus
from megatron_ext.data.sampler import GlobalBatchSampler, collate_micro_batch
from megatron_ext.data.tokenizer import ByteTokenizer, TokenizerArgs, build_tokenizer

__all__ = [
    "ByteTokenizer", "TokenizerArgs", "build_tokenizer", "DataConfig", "add_data_args",
    "build_gpt_datasets", "build_default_corpus", "GlobalBatchSampler", "collate_micro_batch",
]
