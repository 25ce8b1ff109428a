#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device call (bare machine, no
# network): GPU tests, then each benchmark, writing logs/JSON to $OUT (default ./gpu_out).
#
# Prepare here (CPU machine, repo root), once per session:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1 psutil
# Then: device run, carry [".whl"], command "bash benchmarks/gpu_suite.sh [quick|growth]"
# (growth: the batch-growth experiment of issue 6 alone, a second 10-minute call).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'mcore', m.__version__)" | tee -a "$OUT/device.txt"

QUICK=${1:-}
if [ "$QUICK" = growth ]; then
  # Issue 6 on its own device call: batch growth vs fixed batches at equal tokens, small
  # model, real text (all ~12 MB of the Python stdlib, byte tokens; < 1 epoch at 32768 x 256).
  python3 examples/experiment_batch_growth.py --out-dir "$OUT/growth" --nproc 1 \
    --train-samples 32768 --fixed-batches 16,32,64,128 --initial-batch 16 --max-batch 256 \
    --bf16 --num-layers 6 --hidden-size 512 --num-attention-heads 8 --seq-length 256 \
    --max-position-embeddings 256 --micro-batch-size 16 --lr 1e-3 --lr-warmup-samples 2048 \
    --default-corpus-mb 13 --eval-interval 100000 \
    2>&1 | tee "$OUT/growth.log" | tail -15
  exit 0
fi
# 1. GPU tests: the real Triton kernels and SDPA attention on CUDA (CPU-only tests skip/cheap).
python3 -m pytest -q -x tests/test_kernel_wgrad_sample_norm.py tests/test_kernel_norm_param_sample_norm.py \
  tests/test_attention.py tests/test_gns_triton.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
# 2. Fused kernel vs cuBLAS dW (issue 3).
python3 benchmarks/bench_wgrad_sample_norm.py --out "$OUT/wgrad.json" 2>&1 | tee "$OUT/wgrad.log"
# 3. bf16 end-to-end training with the pretrain script (issue 2): tokens/s, TFLOP/s, memory.
torchrun --nproc_per_node 1 examples/pretrain_gpt.py --bf16 --mock-data --num-layers 8 \
  --hidden-size 2048 --num-attention-heads 16 --seq-length 4096 --micro-batch-size 1 \
  --global-batch-size 8 --train-iters 12 --log-interval 4 --lr 3e-4 --make-vocab-size-divisible-by 128 \
  2>&1 | tee "$OUT/pretrain_bf16.log" | grep -E "iteration|megatron_ext:|rror" | tail -5
# 4. GNS overhead (issue 5) and long-context sweep (issue 4).
if [ "$QUICK" = quick ]; then
  python3 benchmarks/bench_gns_overhead.py --layers 8 --seq-length 4096 --out "$OUT/gns_overhead.json" 2>&1 | tee "$OUT/gns.log" | tail -8
  python3 benchmarks/bench_long_context.py --seq-lengths 4096,16384,65536 --recompute none,full --out "$OUT/long_context.json" 2>&1 | tee "$OUT/long.log" | tail -12
else
  python3 benchmarks/bench_gns_overhead.py --out "$OUT/gns_overhead.json" 2>&1 | tee "$OUT/gns.log" | tail -8
  python3 benchmarks/bench_long_context.py --out "$OUT/long_context.json" 2>&1 | tee "$OUT/long.log" | tail -12
fi
