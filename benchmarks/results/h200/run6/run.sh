#!/usr/bin/env bash
# Run 6 on the H200: the fixed gpu tests, the 60 blocks with the measured TUNING (split RoPE loads,
# 4-warp LayerNorm), and the stream benchmark at 512^2 on the full-size random-weight pipeline.
set -u
OUT=${OUT:-out/run6}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run6 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_offload.py tests/test_engine_features.py \
  tests/test_fused.py -k "graph or offload or engine" > "$OUT/gpu_tests.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
V=bf16,fp8-triton+fused,fp8-triton+fused+graphs
for hw in 1024 512; do
  timeout -s INT 110 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height $hw --width $hw --no-peers --no-load --profile --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-$hw" > "$OUT/e2e60-$hw.log" 2>&1; log "e2e60-$hw rc=$?"
done
timeout -s INT 250 python3 -m benchmarks.stream --sizes 512 --frames 40 --out "$OUT/stream" > "$OUT/stream.log" 2>&1; log "stream rc=$?"
tar czf "$OUT/../run6.tar.gz" -C "$OUT" . ; mv "$OUT/../run6.tar.gz" "$OUT/results.tar.gz"; log done
