#!/usr/bin/env python
"""Tokenize text/JSONL/Parquet files into a Megatron indexed dataset; see
megatron_ext/data/preprocess.py.

Example: python tools/preprocess_data.py --input data/*.jsonl --output-prefix data/my_corpus
then train with --data-path data/my_corpus. With a real tokenizer, from local files, in 8
processes: add --workers 8 --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json
--merge-file merges.txt (or HuggingFaceTokenizer/SentencePieceTokenizer/TikTokenizer with
--tokenizer-model PATH), and train with the same tokenizer flags. Input that is not UTF-8 stops
the run (the file and byte offset are named) unless --errors replace; Ctrl-C/SIGTERM remove the
partial output and exit 130/143.
"""
import os
import sys

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
