#!/usr/bin/env bash
# Run 10 on the H200, call 1: the attention kernel's launch variants (TMA descriptors, Triton's
# warp specialization, P.V accumulated in the wgmma), each config forced; the fused-block and
# attention gpu tests (the CUDA-graph replay test with padded forwards run eagerly: not yet run).
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run10; mkdir -p "$OUT"  # tarred into $DEST at the end
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run10a $(date +%T)] $*" | tee -a "$OUT/run.log"; }
finish() { log done; tar czf "$DEST/run10-call1.tar.gz" -C "$OUT" .; }
trap finish EXIT
log start "$(python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())')"
timeout -s INT 280 python3 benchmarks/results/h200/run10/probe-attention-variants.py "$OUT/probe-attention-variants.jsonl" \
  > "$OUT/probe-attention-variants.log" 2>&1; log "probe rc=$?"
timeout -s INT 240 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused.py tests/test_attention.py \
  > "$OUT/gpu_tests.log" 2>&1; log "tests rc=$?"
tail -n 5 "$OUT/gpu_tests.log" | tee -a "$OUT/run.log"
