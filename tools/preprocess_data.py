#!/usr/bin/env python
"""Tokenize text/JSONL files into a Megatron indexed dataset; see megatron_ext/data/preprocess.py.

Example: python tools/preprocess_data.py --input data/*.jsonl --output-prefix data/my_corpus
then train with --data-path data/my_corpus.
"""
import os
import sys

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
