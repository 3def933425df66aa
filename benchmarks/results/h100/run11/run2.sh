#!/usr/bin/env bash
# Run 11, call 2: the real 60 blocks at 8,400 tokens in one process: bf16 eager, bf16 + compile,
# torchao fp8 rowwise + compile (both compiled block by block), ours fused, ours fused + int8-fp8
# attention; then the sweep's larger sizes, 768^2 (4,816 tokens) and 1440^2 (16,408), ours fused
# against bf16 eager.
CALL=2; source benchmarks/results/h100/run11/_pre.sh
timeout -s INT 330 $E2E --height 1024 --width 1024 --compile-peers \
  --only bf16+compile,torchao-fp8-rowwise+compile,fp8-triton+fused,fp8-triton+fused+int8attn \
  --out "$OUT/e2e60-compile" > "$OUT/e2e60-compile.log" 2>&1; log "e2e60-compile rc=$?"
for hw in 768 1440; do
  timeout -s INT 80 $E2E --height $hw --width $hw --no-peers --no-compile-peers --only fp8-triton+fused \
    --out "$OUT/e2e60-$hw" > "$OUT/e2e60-$hw.log" 2>&1; log "e2e60-$hw rc=$?"
done
