#!/usr/bin/env bash
# Issue 11's GPU cells in one prepared run, for a session lent a GPU (15 minutes of device time in all):
# first the bf16 training rows at batch 64 (forward + backward and full step; eager, compiled, CUDA graphs;
# training memory), then the B/16 TokenLearner inference cells (tf32 / bf16 at batches 8 and 64, fp32
# 'highest' rows too). Each command rewrites its table after every row, so a run cut off keeps what it measured.
#   bash benchmarks/gpu_issue11.sh   -> benchmarks/results/gpu_train.md, gpu.md, gpu_overhead.md
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # else jax reserves 75% of the GPU at its first use
python benchmarks/bench_speed.py --device cuda --rows train --only "B/16 TokenLearner" \
    --train-precision bf16 --train-batches 64 --optimizer torch,optax --repeats 10 \
    --out benchmarks/results/gpu_train.md
python benchmarks/bench_speed.py --device cuda --rows infer --only "B/16 TokenLearner" \
    --precision tf32,bf16,highest --batches 8,64 --repeats 20 --no-memory \
    --out benchmarks/results/gpu.md
# host-side cost of one eager forward at tiny widths (what bounds the small-batch eager cells)
python benchmarks/bench_overhead.py --device cuda --repeats 200 | tee benchmarks/results/gpu_overhead.md
