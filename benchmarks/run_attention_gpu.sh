#!/usr/bin/env bash
# The int8-fp8 attention on a GPU, in one command (H200: ~3-4 minutes; each step under `timeout`,
# SIGINT at the limit, so a step cut short still writes the rows it measured):
#
#   bash benchmarks/run_attention_gpu.sh OUT_DIR
#
#   1. pytest -m gpu tests/test_attention.py   -> OUT_DIR/attention_gpu_tests.log   (cap 120 s)
#   2. benchmarks.attention (S 4300/8400/16600, B 1/2, 24 x 128, every SDPA backend, the model's
#      call patterns)                          -> OUT_DIR/attention.{csv,json,png}, attention_bench.log
#                                                                                   (cap 170 s)
#   3. benchmarks.kernel_report --only attention (sm90 compile figures of the same commit)
#                                              -> OUT_DIR/kernels.{csv,json}         (cap 60 s)
#
# Environment: PYTHON (default python3).
set -uo pipefail
OUT_DIR=${1:?usage: run_attention_gpu.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
timeout -s INT 120 "$PYTHON" -m pytest -m gpu tests/test_attention.py -q -rA -p no:cacheprovider \
    2>&1 | tee "$OUT_DIR/attention_gpu_tests.log"
timeout -s INT 170 "$PYTHON" -m benchmarks.attention --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/attention_bench.log"
timeout -s INT 60 "$PYTHON" -m benchmarks.kernel_report --only attention --out "$OUT_DIR" \
    2>&1 | tail -n 12 | tee -a "$OUT_DIR/attention_bench.log"
