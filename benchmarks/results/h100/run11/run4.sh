#!/usr/bin/env bash
# Run 11, call 4 (the session's last ~8 device minutes, in place of run3.sh's 7): call 1's fused
# gpu tests again, verbose, on a warm Triton cache (call 1's timed out compiling, three of them
# failing), then the stream at 256^2 alone.
CALL=4; source benchmarks/results/h100/run11/_pre.sh
timeout -s INT 250 python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_fused.py -k "epilogue or replayed" \
  > "$OUT/gpu_tests_fused.log" 2>&1; log "fused tests rc=$?"
timeout -s INT 170 python3 -m benchmarks.stream --sizes 256 --seconds 5 --quality-frames 4 --out "$OUT/stream" \
  > "$OUT/stream.log" 2>&1; log "stream rc=$?"
