#!/usr/bin/env bash
# Run 11 on the H200, call 1: the stream at the two sizes the stream issue names that run 10 did
# not measure (256^2, 384^2; 512^2 is call 2's, three sizes do not fit one call), every variant,
# the quantized ones with fp8-triton (the benchmark's default now); the epilogue pass's and the
# replay's gpu tests (the replay's temporaries now in a per-stream scratch buffer).
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run11; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run11a $(date +%T)] $*" | tee -a "$OUT/run.log"; }
finish() { log done; tar czf "$DEST/run11-call1.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 100 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_triton.py -k "replay" \
  > "$OUT/gpu_tests_replay.log" 2>&1; log "replay tests rc=$?"
timeout -s INT 80 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused.py -k "epilogue or replayed" \
  > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$?"
timeout -s INT 400 python3 -m benchmarks.stream --sizes 256,384 --seconds 6 --quality-frames 8 \
  --out "$OUT/stream" > "$OUT/stream.log" 2>&1; log "stream rc=$?"
