#!/usr/bin/env bash
# Run 9 on the H200, call 6: batched CFG again, the padded text keys now sliced out of attention on CUDA instead
# of masked (call 5: 1.03x an image, the masked batch-2 forward 229 ms against 127 a batch-1 pass). Run 7
# measured none in bf16, which is GPU-bound at ~2,300 tokens; the fused eager path is host-bound).
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run9; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run9f $(date +%T)] $*" | tee -a "$OUT/run6.log"; }
finish() { log done; tar czf "$DEST/run9-call6.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 170 python3 -m benchmarks.pipeline --quant-backend fp8-triton --text-encoder-backend none \
  --variants engine-fp8-fused,engine-fp8-fused-batched-cfg --images 1 --steps 4 --cfg 4 --size 512 \
  --reference-pixels 262144 --reps 2 --warmup 1 --out "$OUT/p2" > "$OUT/p2.log" 2>&1; log "p2 rc=$?"
