"""Benchmark: tools/preprocess_data.py throughput (MB/s of text) with 1 and 2 tokenizer workers.

Usage:
    python benchmarks/bench_preprocess.py [--mb 4] [--vocab-size 4000] [--workers 1 2]
        [--repeats 2] [--out preprocess.json]
    python benchmarks/bench_preprocess.py --quick     # smoke test (~0.3 MB, tiny tokenizer)

CPU only, no download. The corpus is the default corpus's text (the Python stdlib's ``*.py``
sources, first --mb MB in sorted order), one document per file. The tokenizer is a byte-level
BPE with --vocab-size entries trained here with the ``tokenizers`` library on the first
--train-files of those files and saved as a HuggingFace tokenizer directory in a temporary
directory; preprocessing uses it as ``--tokenizer-type HuggingFaceTokenizer`` through the
product's ``preprocess()`` (the same code as the CLI, minus the CLI's one-off megatron import,
which a warm-up run takes out of the timings). Each worker count runs --repeats times in
alternation; the best time of each counts. MB/s is UTF-8 text bytes per wall-clock second,
pool start-up included; CPU seconds add up this process and its workers (equal CPU seconds for
1 and 2 workers mean the pool itself costs nothing). The outputs of all worker counts must be
byte-identical.

Target: 2 workers >= 1.6x one worker. A machine's "cores" may not be independent (hyperthread
siblings, a throttled VM), so the script also times a pure-Python CPU loop in 1 and 2
processes and prints that ratio too: it is the most any worker pool can get there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.preprocess import preprocess  # noqa: E402
from megatron_ext.data.tokenizer import TokenizerArgs  # noqa: E402
from megatron_ext.data.tokenizer_training import stdlib_sources, train_byte_level_bpe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=float, default=4.0, help="corpus size (MB of stdlib sources)")
    p.add_argument("--vocab-size", type=int, default=4000, help="BPE vocabulary to train")
    p.add_argument("--train-files", type=int, default=20, help="stdlib files to train it on")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per worker count")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny corpus and tokenizer")
    args = p.parse_args(argv)
    if args.quick:
        args.mb, args.vocab_size, args.train_files, args.repeats = 0.3, 500, 3, 1
    return args


def _spin(n: int) -> float:
    start, x = time.perf_counter(), 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - start


def cpu_scaling(processes: int, n: int = 3_000_000) -> float:
    """Throughput of ``processes`` CPU-bound Python processes relative to one."""
    one = _spin(n)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        pool.map(_spin, [n] * processes)
        many = time.perf_counter() - start
    return processes * one / many


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _sha256(prefix: str) -> str:
    h = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def run(args) -> dict:
    files = stdlib_sources(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        start = time.perf_counter()
        paths = train_byte_level_bpe(files[:args.train_files], tmp, args.vocab_size)
        train_s = time.perf_counter() - start
        tok = TokenizerArgs("HuggingFaceTokenizer", tokenizer_model=paths["hf_dir"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron-core's import-time notices
            preprocess(files[:2], os.path.join(tmp, "warmup"), tok, progress_interval=0)
        best, digests, stats = {}, {}, None
        for _ in range(args.repeats):
            for w in args.workers:
                prefix = os.path.join(tmp, f"out_w{w}")
                start, cpu = time.perf_counter(), _cpu_seconds()
                stats = preprocess(files, prefix, tok, workers=w, progress_interval=0)
                wall = time.perf_counter() - start
                if wall < best.get(w, (float("inf"),))[0]:
                    best[w] = (wall, _cpu_seconds() - cpu)
                digests[w] = _sha256(prefix)
    base = args.workers[0]
    return {
        "corpus_files": len(files), "text_mb": stats.text_bytes / 1e6, "tokens": stats.tokens,
        "documents": stats.documents, "vocab_size": args.vocab_size, "train_s": train_s,
        "cpu_count": os.cpu_count(), "identical": len(set(digests.values())) == 1,
        "runs": [{"workers": w, "seconds": best[w][0], "cpu_seconds": best[w][1],
                  "mb_per_s": stats.text_bytes / 1e6 / best[w][0],
                  "docs_per_s": stats.documents / best[w][0],
                  "speedup": best[base][0] / best[w][0]} for w in args.workers],
        "cpu_loop_scaling": {w: cpu_scaling(w) for w in args.workers if w > 1},
    }


def report(result: dict) -> None:
    print(f"corpus: {result['corpus_files']} stdlib files, {result['text_mb']:.2f} MB, "
          f"{result['tokens']} tokens; BPE vocab {result['vocab_size']} trained in "
          f"{result['train_s']:.1f}s; {result['cpu_count']} CPUs")
    print("| workers | seconds | CPU seconds | MB/s | docs/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["runs"]:
        print(f"| {r['workers']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{r['mb_per_s']:.2f} | {r['docs_per_s']:.0f} | {r['speedup']:.2f}x |")
    for w, ratio in result["cpu_loop_scaling"].items():
        run = next(r for r in result["runs"] if r["workers"] == w)
        print(f"{w} workers / 1 = {run['speedup']:.2f}x (target >= 1.6x for 2); a pure-Python "
              f"CPU loop in {w} processes here: {ratio:.2f}x")
    print(f"outputs byte-identical across worker counts: {'yes' if result['identical'] else 'NO'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
