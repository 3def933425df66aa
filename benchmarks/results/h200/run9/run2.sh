#!/usr/bin/env bash
# Run 9 on the H200, call 2: the quant kernels with every load before the first reduction (gpu
# tests, launch choices), then seconds per edited image on the full-size random-weight pipeline
# with the one-pass weight upcast (int8 text encoder), an fp8-triton text encoder, and the 24 GB
# mode (model CPU offload) in its own process. Results tarred: one file comes back.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run9; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run9b $(date +%T)] $*" | tee -a "$OUT/run2.log"; }
log start
# test_triton / test_fused run on CUDA whenever it is there (their quant tests carry no gpu mark)
timeout -s INT 90 python3 -m pytest -q -p no:cacheprovider -rA tests/test_triton.py tests/test_fused.py \
  -k "quantize or chunk or reciprocal or layernorm_modulate" > "$OUT/gpu_tests2.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests2.log)"
timeout -s INT 60 python3 -m benchmarks.fused_kernels --out "$OUT/fused_kernels2" > "$OUT/fused_kernels2.log" 2>&1
log "fused_kernels rc=$?"
P="--quant-backend fp8-triton --images 1 --steps 8 --cfg 1 --reps 2 --warmup 1"
timeout -s INT 200 python3 -m benchmarks.pipeline $P \
  --variants diffusers-bf16,engine-bf16,engine-fp8,engine-fp8-fused,engine-fp8-fused-graphs \
  --out "$OUT/p1" > "$OUT/p1.log" 2>&1; log "p1 rc=$?"
timeout -s INT 90 python3 -m benchmarks.pipeline $P --text-encoder-backend fp8-triton \
  --variants engine-fp8,engine-fp8-fused-graphs --out "$OUT/p1-te-fp8" > "$OUT/p1-te-fp8.log" 2>&1; log "p1-te-fp8 rc=$?"
timeout -s INT 130 python3 -m benchmarks.pipeline $P --variants engine-fp8-24gb \
  --out "$OUT/p24" > "$OUT/p24.log" 2>&1; log "p24 rc=$?"
log done; tar czf "$DEST/run9-call2.tar.gz" -C "$OUT" .
