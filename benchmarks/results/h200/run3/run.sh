#!/usr/bin/env bash
# Run 3 on the H200: gpu tests of the new code, the attention benchmark, the real 60 blocks with
# fused / graphed / int8-fp8-attention variants, profiled. Writes under $OUT as it goes.
set -u
OUT=${OUT:-out/run3}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d); python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run3 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log start
timeout -s INT 100 python3 -m pytest -q -m gpu tests/test_fused.py tests/test_attention.py tests/test_checkpoint.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
timeout -s INT 80 python3 -m benchmarks.attention --out "$OUT/attention" --s 8400,16600 --b 1 > "$OUT/attention.log" 2>&1; log "attention rc=$?"
V=bf16,bf16+graphs,fp8-triton+fused,fp8-triton+fused+graphs,fp8-triton+fused+int8attn,fp8-triton+fused+int8attn+graphs
timeout -s INT 210 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --no-peers --no-load --profile --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-1024" > "$OUT/e2e60-1024.log" 2>&1; log "e2e60-1024 rc=$?"
V=bf16,bf16+graphs,fp8-triton+fused,fp8-triton+fused+graphs
timeout -s INT 130 python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --height 512 --width 512 --no-peers --no-load --profile --reps 5 --warmup 1 --only $V --out "$OUT/e2e60-512" > "$OUT/e2e60-512.log" 2>&1; log "e2e60-512 rc=$?"
tar czf "$OUT/results.tar.gz" -C "$OUT" --exclude=results.tar.gz . ; log done
