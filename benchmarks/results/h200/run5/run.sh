#!/usr/bin/env bash
# Run 5 on the H200: the gpu tests of the merged integration / engine / attention work (diffusers
# 0.37.1, accelerate, peft from wheels), then the fused kernels' launch choices against the copy rate.
set -u
OUT=${OUT:-out/run5}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run5 $(date +%T)] $*" | tee -a "$OUT/run.log"; }
log "start $(python3 -c 'import torch,triton,diffusers,accelerate,peft,psutil,yaml;print(torch.__version__,triton.__version__,diffusers.__version__,accelerate.__version__,peft.__version__)' 2>&1 | tail -1)"
timeout -s INT 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  tests/test_device_follow.py tests/test_offload.py tests/test_checkpoint.py tests/test_engine_features.py \
  tests/test_fused.py tests/test_attention.py -k "not test_gpu_no_host_sync" > "$OUT/gpu_tests.log" 2>&1
log "tests rc=$? $(tail -1 $OUT/gpu_tests.log)"
timeout -s INT 150 python3 -m benchmarks.fused_kernels --out "$OUT/fused_kernels" > "$OUT/fused_kernels.log" 2>&1
log "fused_kernels rc=$?"
tar czf "$OUT/../run5.tar.gz" -C "$OUT" . ; mv "$OUT/../run5.tar.gz" "$OUT/results.tar.gz"; log done
