"""Data fixtures shared by test modules: ``write_pretokenized``."""
import numpy


def write_pretokenized(prefix, docs, dtype=numpy.uint16):
    """A Megatron indexed dataset of given id lists, written by megatron-core's own builder
    (what Megatron-LM's preprocess_data.py produces with any tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(numpy.asarray(doc, dtype=numpy.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
