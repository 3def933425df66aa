#!/usr/bin/env bash
# Run 11, call 3: the stream at 256^2 and 384^2 (the sizes run 10 did not measure), every variant,
# the quantized ones with fp8-triton, the plain bf16 loop and fused + graphs in one process.
CALL=3; source benchmarks/results/h100/run11/_pre.sh
timeout -s INT 420 python3 -m benchmarks.stream --sizes 256,384 --seconds 6 --quality-frames 8 \
  --out "$OUT/stream" > "$OUT/stream.log" 2>&1; log "stream rc=$?"
