#!/usr/bin/env bash
# Run 9 on the H200, call 1: the rewritten per-token quant and LayerNorm+modulate+quant kernels
# (exact row chunks, one max.NaN reduction, x * (1/scale)): their gpu tests (bit-exact against the
# reference on CUDA), their launch choices against the copy rate, and the 60 blocks at 8,400 and
# 2,256 tokens (fused, profiled) against bf16 in the same process.
set -u
OUT=${OUT:-out/run9}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run9 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_triton.py tests/test_fused.py \
  -k "quantize or chunk or reciprocal or layernorm_modulate" > "$OUT/gpu_tests.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
timeout -s INT 130 python3 -m benchmarks.fused_kernels --out "$OUT/fused_kernels" > "$OUT/fused_kernels.log" 2>&1
log "fused_kernels rc=$?"
V=bf16,fp8-triton+fused
timeout -s INT 150 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height 1024 --width 1024 --no-peers \
  --no-load --profile --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-1024" > "$OUT/e2e60-1024.log" 2>&1
log "e2e60-1024 rc=$?"
timeout -s INT 100 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height 512 --width 512 --no-peers \
  --no-load --reps 5 --warmup 1 --only $V,fp8-triton+fused+graphs --out "$OUT/e2e60-512" > "$OUT/e2e60-512.log" 2>&1
log "e2e60-512 rc=$?"
log done
