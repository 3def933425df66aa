#!/usr/bin/env bash
# Run 10 on the H200, call 2: the stream at 512^2 with an 8 s camera (steady result rate and host
# time per stage), all variants; then the fused + graphs variant refreshing the VLM embedding only
# every 8 frames (--vlm-threshold 0); first the gpu tests call 1 did not reach.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run10; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run10b $(date +%T)] $*" | tee -a "$OUT/run2.log"; }
finish() { log done; tar czf "$DEST/run10-call2.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 130 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused.py \
  -k "epilogue_equals_reference or full_width or graph" > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$?"
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/run2.log"
timeout -s INT 270 python3 -m benchmarks.stream --sizes 512 --seconds 8 --out "$OUT/stream" \
  > "$OUT/stream.log" 2>&1; log "stream rc=$?"
timeout -s INT 150 python3 -m benchmarks.stream --sizes 512 --seconds 8 --vlm-threshold 0 \
  --variants batch-skip-reuse-fused-graphs-quant --out "$OUT/stream-vlm8" > "$OUT/stream-vlm8.log" 2>&1
log "stream-vlm8 rc=$?"
