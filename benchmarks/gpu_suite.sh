#!/usr/bin/env bash
# The GPU session's run is benchmarks/gpu_run.py (see benchmarks/RESULTS.md, "GPU run");
# `bash benchmarks/gpu_suite.sh growth` runs issue 6's batch-growth experiment in its own call.
set -uo pipefail
if [ "${1:-}" != growth ]; then exec python3 benchmarks/gpu_run.py "$@"; fi
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 benchmarks/gpu_run.py --stages none --out "$OUT" "${@:2}" >/dev/null  # wheels + package
export PYTHONPATH=/tmp/megatron_ext_gpu_run/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 examples/experiment_batch_growth.py --out-dir "$OUT/growth" --nproc 1 \
  --train-samples 32768 --fixed-batches 16,32,64,128 --initial-batch 16 --max-batch 256 \
  --bf16 --num-layers 6 --hidden-size 512 --num-attention-heads 8 --seq-length 256 \
  --max-position-embeddings 256 --micro-batch-size 16 --lr 1e-3 --lr-warmup-samples 2048 \
  --default-corpus-mb 13 --eval-interval 100000 2>&1 | tee "$OUT/growth.log" | tail -15
