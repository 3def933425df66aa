#!/usr/bin/env bash
# Run 9 on the H200, call 4: seconds per image with the diffusers baseline in the same process,
# for the two fastest text-encoder choices of call 3: bf16 (no quantization) and fp8-scaled-mm.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run9; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run9d $(date +%T)] $*" | tee -a "$OUT/run4.log"; }
finish() { log done; tar czf "$DEST/run9-call4.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
P="--quant-backend fp8-triton --images 1 --steps 8 --cfg 1 --reps 3 --warmup 1"
for te in none fp8-scaled-mm; do
  timeout -s INT 170 python3 -m benchmarks.pipeline $P --text-encoder-backend $te \
    --variants diffusers-bf16,engine-bf16,engine-fp8-fused-graphs --out "$OUT/p1-te-$te" > "$OUT/p1-te-$te.log" 2>&1
  log "p1-te-$te rc=$?"
done
