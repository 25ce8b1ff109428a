"""torchrun worker for tests/test_hf_interop.py: a HuggingFace import under TP=2.

Run: ``torchrun --nproc_per_node 2 tests/dist/hf_worker.py --hf-dir HF --ckpt CKPT --out DIR``
(CPU, gloo). With the product's converter and loader (``megatron_ext.hf.convert``):

1. import ``HF`` under ``--tensor-model-parallel-size 2`` (each rank converts its shards) into
   ``DIR/tp2``, then load that under TP=2: logits -> ``DIR/tp2_import.pt``;
2. load ``CKPT`` (imported in one process) under TP=2 with sequence parallelism: logits ->
   ``DIR/tp1_import.pt``.
Rank 0 writes the logits of ``DIR/tokens.pt`` (all vocabulary shards gathered); the test
compares them with the ``transformers`` model's.
"""
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine

import argparse  # noqa: E402

import torch  # noqa: E402

from megatron_ext.hf.convert import full_logits, import_hf, loaded_model  # noqa: E402

TP2 = ["--tensor-model-parallel-size", "2"]


def logits_of(ckpt, args, tokens, out):
    with loaded_model(ckpt, args) as (_, gpt, _):
        logits = full_logits(gpt, tokens)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tokens = torch.load(os.path.join(a.out, "tokens.pt"))
    import_hf(a.hf_dir, os.path.join(a.out, "tp2"), TP2)
    logits_of(os.path.join(a.out, "tp2"), TP2, tokens, os.path.join(a.out, "tp2_import.pt"))
    logits_of(a.ckpt, TP2 + ["--sequence-parallel"], tokens, os.path.join(a.out, "tp1_import.pt"))
    print("HF_WORKER_OK", flush=True)


if __name__ == "__main__":
    sys.exit(main())
