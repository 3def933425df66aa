#!/usr/bin/env bash
# Run 7 on the H200: seconds per edited image on the full-size random-weight Qwen-Image-Edit
# pipeline (benchmarks.pipeline), per variant; the CUDA-graph replay test.
set -u
OUT=${OUT:-out/run7}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run7 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 300 python3 -m benchmarks.pipeline --quant-backend fp8-triton \
  --variants diffusers-bf16,engine-bf16,engine-fp8,engine-fp8-cache,checkpoint-load,engine-fp8-fused,engine-fp8-fused-graphs \
  --images 1 --steps 8 --cfg 1 --reps 2 --warmup 1 --out "$OUT/p1" > "$OUT/p1.log" 2>&1; log "p1 rc=$?"
timeout -s INT 100 python3 -m benchmarks.pipeline --quant-backend fp8-triton --variants engine-bf16,engine-bf16-batched-cfg \
  --images 1 --steps 4 --cfg 4 --size 512 --reference-pixels 262144 --reps 2 --warmup 1 --out "$OUT/p2" > "$OUT/p2.log" 2>&1; log "p2 rc=$?"
timeout -s INT 110 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_fused.py -k "graph" > "$OUT/gpu_tests.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
tar czf "$OUT/../run7.tar.gz" -C "$OUT" . ; mv "$OUT/../run7.tar.gz" "$OUT/results.tar.gz"; log done
