# Shared by the run12 scripts (sourced): results tarred into $OUT as run12-call$CALL.tar.gz.
set -u
DEST=${OUT:-out}; OUT=$(mktemp -d)/run12; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1 HF_HUB_OFFLINE=1
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
  .whl/accelerate-*.whl .whl/peft-*.whl .whl/torchao-*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE"
log() { echo "[run12-$CALL $(date +%T)] $*" | tee -a "$OUT/run.log"; }
finish() { log done; tar czf "$DEST/run12-call$CALL.tar.gz" -C "$OUT" .; }
trap finish EXIT
nvidia-smi -L > "$OUT/device.txt" 2>&1; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/device.txt" 2>&1
log start
E2E="python3 -m benchmarks.e2e --blocks 60 --reference --zero-cond-t --no-load --reps 5 --warmup 1"
