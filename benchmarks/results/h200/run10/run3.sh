#!/usr/bin/env bash
# Run 10 on the H200, call 3: the stream again with the decode on its own stream (call 2: the
# decode's pageable copy made the host wait out every forward), all variants, then the fused +
# graphs variant with the VLM embedding every 8th frame; first the fused-block gpu tests call 2
# did not finish (the fp8 epilogue bound, the CUDA-graph replay).
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run10; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run10c $(date +%T)] $*" | tee -a "$OUT/run3.log"; }
finish() { log done; tar czf "$DEST/run10-call3.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 200 python3 -m benchmarks.stream --sizes 512 --seconds 8 --out "$OUT/stream" \
  > "$OUT/stream.log" 2>&1; log "stream rc=$?"
timeout -s INT 80 python3 -m benchmarks.stream --sizes 512 --seconds 8 --vlm-threshold 0 \
  --variants batch-skip-reuse-fused-graphs-quant --out "$OUT/stream-vlm8" > "$OUT/stream-vlm8.log" 2>&1
log "stream-vlm8 rc=$?"
timeout -s INT 220 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused.py \
  -k "epilogue_equals_reference or full_width or graph" > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$?"
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/run3.log"
