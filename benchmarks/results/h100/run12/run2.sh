#!/usr/bin/env bash
# Run 12, call 2 (2026-12-07, after call 1 on the same H100): every gpu-marked test in one run (the
# last whole run was the H200's at 2a2168f, 81 tests; run 11's test calls hit their caps), and the
# stream's fused + graphs row at 384^2 with the VLM embedding refreshed on its 8-frame period only
# (--vlm-threshold 0): call 1 showed the VLM encode taking 116 of the 172 ms tick on the moving scene.
CALL=2; source benchmarks/results/h100/run12/_pre.sh
timeout -s INT 380 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests \
  > "$OUT/gpu_tests.log" 2>&1; log "gpu tests rc=$?"
timeout -s INT 150 python3 -m benchmarks.stream --sizes 384 --seconds 5 --quality-frames 4 --vlm-threshold 0 \
  --variants batch-skip-reuse-fused-graphs-quant --out "$OUT/stream-vlm8" > "$OUT/stream-vlm8.log" 2>&1; log "stream-vlm8 rc=$?"
