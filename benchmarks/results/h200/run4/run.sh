#!/usr/bin/env bash
# Run 4 on the H200: the gpu tests of the fused path and the attention with room to autotune, and
# the 60 blocks with CUDA graphs (run 3's graph rows failed: fixed), profiled.
set -u
OUT=${OUT:-out/run4}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d); python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run4 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 210 python3 -m pytest -q -m gpu tests/test_fused.py tests/test_attention.py -p no:cacheprovider -rA > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
V=bf16,bf16+graphs,fp8-triton+fused,fp8-triton+fused+graphs
for hw in 512 1024; do
  timeout -s INT 150 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height $hw --width $hw --no-peers --no-load --profile --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-$hw" > "$OUT/e2e60-$hw.log" 2>&1; log "e2e60-$hw rc=$?"
done
tar czf "$OUT/../run4.tar.gz" -C "$OUT" . ; mv "$OUT/../run4.tar.gz" "$OUT/results.tar.gz"; log done
