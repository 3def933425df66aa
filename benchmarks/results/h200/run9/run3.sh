#!/usr/bin/env bash
# Run 9 on the H200, call 3: the weight-only upcast as one Triton kernel (gpu test), the chunked
# LayerNorm kernel (TUNING from call 2), seconds per image again (int8-layerwise text encoder),
# the 24 GB mode with more time, an fp8-scaled-mm text encoder, and the fused 60 blocks' profile.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run9; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run9c $(date +%T)] $*" | tee -a "$OUT/run3.log"; }
finish() { log done; tar czf "$DEST/run9-call3.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 60 python3 -m pytest -q -p no:cacheprovider -rA tests/test_triton.py tests/test_fused.py \
  -k "dequantize or layernorm_modulate_quant_equals" > "$OUT/gpu_tests3.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests3.log)"
P="--quant-backend fp8-triton --images 1 --steps 8 --cfg 1"
timeout -s INT 150 python3 -m benchmarks.pipeline $P --reps 2 --warmup 1 \
  --variants diffusers-bf16,engine-bf16,engine-fp8-fused-graphs --out "$OUT/p1" > "$OUT/p1.log" 2>&1; log "p1 rc=$?"
timeout -s INT 170 python3 -m benchmarks.pipeline $P --reps 1 --warmup 1 --variants engine-fp8-24gb \
  --out "$OUT/p24" > "$OUT/p24.log" 2>&1; log "p24 rc=$?"
timeout -s INT 100 python3 -m benchmarks.pipeline $P --reps 2 --warmup 1 --text-encoder-backend fp8-scaled-mm \
  --variants engine-fp8-fused-graphs --out "$OUT/p1-te-fp8" > "$OUT/p1-te-fp8.log" 2>&1; log "p1-te-fp8 rc=$?"
timeout -s INT 90 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height 1024 --width 1024 --no-peers \
  --no-load --profile --reps 5 --warmup 1 --only bf16,fp8-triton+fused --out "$OUT/e2e60-1024" > "$OUT/e2e60-1024.log" 2>&1
log "e2e60-1024 rc=$?"
