#!/usr/bin/env bash
# Run 11 on the H200, call 3: issue 20's two unmeasured comparisons. (1) The real 60 blocks at
# 8,400 tokens, one process: bf16 eager, bf16 + torch.compile, torchao fp8 rowwise +
# torch.compile (both compiled block by block), ours fused, ours fused + int8-fp8 attention.
# (2) Never slower than bf16 from ~1,000 to ~16,600 tokens: bf16 and ours fused (eager) at
# 320^2 (1,008 tokens), 768^2 (4,816) and 1440^2 (16,408), each with one reference image.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run11; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl .whl/torchao-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run11c $(date +%T)] $*" | tee -a "$OUT/run3.log"; }
finish() { log done; tar czf "$DEST/run11-call3.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
E2E="python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --no-load --reps 5 --warmup 1"
timeout -s INT 330 $E2E --height 1024 --width 1024 --compile-peers \
  --only bf16+compile,torchao-fp8-rowwise+compile,fp8-triton+fused,fp8-triton+fused+int8attn \
  --out "$OUT/e2e60-compile" > "$OUT/e2e60-compile.log" 2>&1; log "e2e60-compile rc=$?"
for hw in 320 768 1440; do
  timeout -s INT 80 $E2E --height $hw --width $hw --no-peers --no-compile-peers --only fp8-triton+fused \
    --out "$OUT/e2e60-$hw" > "$OUT/e2e60-$hw.log" 2>&1; log "e2e60-$hw rc=$?"
done
