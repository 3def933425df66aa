#!/usr/bin/env bash
# Run 11 on the H200, call 2: the stream at 512^2, every variant, fp8-triton (the third
# size; run 10 measured it with fp8-scaled-mm and one fp8-triton row); the fp8-scaled-mm fused row
# with the epilogue as one Triton pass (run 10: 3.25 frames/s, a 282 ms forward); the host time
# per quantized Linear on the GPU host, at the attention shape and the modulation's 3072 -> 18432.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run11; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run11b $(date +%T)] $*" | tee -a "$OUT/run2.log"; }
finish() { log done; tar czf "$DEST/run11-call2.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start
timeout -s INT 150 python3 -m benchmarks.host_overhead --no-peers --shapes 3072x3072,3072x18432 \
  --only fp8-triton,int8-triton,fp8-triton+noreplay,fp8-scaled-mm --out "$OUT/host" > "$OUT/host.log" 2>&1
log "host rc=$?"
timeout -s INT 230 python3 -m benchmarks.stream --sizes 512 --seconds 6 --quality-frames 8 \
  --out "$OUT/stream" > "$OUT/stream.log" 2>&1; log "stream rc=$?"
timeout -s INT 100 python3 -m benchmarks.stream --sizes 512 --seconds 6 --quality-frames 0 \
  --quant-backend fp8-scaled-mm --variants batch-skip-reuse-fused-graphs-quant --out "$OUT/stream-scaled-mm" \
  > "$OUT/stream-scaled-mm.log" 2>&1; log "stream-scaled-mm rc=$?"
# the fused blocks' GEMMs and ops replayed (new since run 9): fused eager at 2,256 tokens,
# run 8: 81.0 ms, run 9: 109.2 (graphs: 51.6)
timeout -s INT 95 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --no-load --reps 5 --warmup 1 \
  --height 512 --width 512 --no-peers --no-compile-peers --only fp8-triton+fused,fp8-triton+fused+noreplay,fp8-triton+fused+graphs \
  --out "$OUT/e2e60-512" > "$OUT/e2e60-512.log" 2>&1; log "e2e60-512 rc=$?"
