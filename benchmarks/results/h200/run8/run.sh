#!/usr/bin/env bash
# Run 8 on the H200: the replayed Triton forwards (host time per layer, the 60 blocks at 2,256
# tokens with and without the replay) and their gpu test.
set -u
OUT=${OUT:-out/run8}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run8 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_triton.py \
  -k "replayed or fast_launch or does_not_sync" > "$OUT/gpu_tests.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
timeout -s INT 90 python3 -m benchmarks.host_overhead --no-peers --only bf16,int8-triton,fp8-triton,fp8-triton+noreplay \
  --rounds 5 --out "$OUT/host" > "$OUT/host.log" 2>&1; log "host rc=$?"
V=bf16,fp8-triton,fp8-triton+noreplay,fp8-triton+fused,fp8-triton+fused+noreplay
timeout -s INT 270 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height 512 --width 512 --no-peers \
  --no-load --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-512" > "$OUT/e2e60-512.log" 2>&1; log "e2e60-512 rc=$?"
log done
