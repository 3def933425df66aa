#!/usr/bin/env bash
# Run 10 on the H200, call 4: a stream tick's stages, each timed with the device synchronized
# around it (probe-stream-stages.py).
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run10; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run10d $(date +%T)] $*" | tee -a "$OUT/run4.log"; }
finish() { log done; tar czf "$DEST/run10-call4.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 240 python3 benchmarks/results/h200/run10/probe-stream-stages.py "$OUT/probe-stream-stages.json" \
  > "$OUT/probe-stream-stages.log" 2>&1; log "probe rc=$?"
tail -n 60 "$OUT/probe-stream-stages.log"
