#!/usr/bin/env bash
# Run 2 on the H200: the fused block path. Writes under $OUT as it goes.
#   OUT=... bash benchmarks/results/h200/run2/run.sh
set -u
OUT=${OUT:-out/run2}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d); python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run2 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log "start"; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee -a "$OUT/run.log"
timeout 150 python3 -m pytest -q -m gpu tests/test_fused.py tests/test_triton.py -x -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
V=bf16,fp8-triton,fp8-triton+tma,fp8-triton+fused,fp8-triton+fused+tma,int8-triton,int8-triton+fused
timeout 150 python3 -m benchmarks.e2e --blocks 6 --reference --zero-cond-t --no-peers --no-load --only $V --out "$OUT/e2e-8400" > "$OUT/e2e-8400.log" 2>&1; log "e2e-8400 rc=$?"
timeout 100 python3 -m benchmarks.e2e --blocks 6 --reference --zero-cond-t --height 512 --width 512 --no-peers --no-load --only $V --out "$OUT/e2e-2100" > "$OUT/e2e-2100.log" 2>&1; log "e2e-2100 rc=$?"
timeout 170 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --no-peers --no-load --reps 5 --warmup 1 --only bf16,fp8-triton,fp8-triton+fused+tma --out "$OUT/e2e60-8400" > "$OUT/e2e60-8400.log" 2>&1; log "e2e60 rc=$?"
log "done"
