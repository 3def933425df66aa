#!/usr/bin/env bash
# Run 11, call 1 (regrouped 2026-12-07 by priority: 30 device minutes hold ~3 calls): the replay's
# gpu tests (replay is on by default and has never run on a real driver), the fused epilogue's;
# host time per quantized Linear on the GPU host (issue 20's <= 30 us), at the attention shape and
# the modulation's 3072 -> 18432; the 60 fused blocks at 2,256 tokens with and without replay and
# with graphs; the sweep's smallest size (320^2 + reference, 1,008 tokens) against bf16.
CALL=1; source benchmarks/results/h100/run11/_pre.sh
timeout -s INT 100 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_triton.py -k "replay" \
  > "$OUT/gpu_tests_replay.log" 2>&1; log "replay tests rc=$?"
timeout -s INT 80 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused.py -k "epilogue or replayed" \
  > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$?"
timeout -s INT 150 python3 -m benchmarks.host_overhead --no-peers --shapes 3072x3072,3072x18432 \
  --only fp8-triton,int8-triton,fp8-triton+noreplay,fp8-scaled-mm --out "$OUT/host" > "$OUT/host.log" 2>&1
log "host rc=$?"
timeout -s INT 95 $E2E --height 512 --width 512 --no-peers --no-compile-peers \
  --only fp8-triton+fused,fp8-triton+fused+noreplay,fp8-triton+fused+graphs \
  --out "$OUT/e2e60-512" > "$OUT/e2e60-512.log" 2>&1; log "e2e60-512 rc=$?"
timeout -s INT 80 $E2E --height 320 --width 320 --no-peers --no-compile-peers --only fp8-triton+fused \
  --out "$OUT/e2e60-320" > "$OUT/e2e60-320.log" 2>&1; log "e2e60-320 rc=$?"
