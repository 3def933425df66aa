#!/usr/bin/env bash
# The GPU benchmark suite in one command:
#
#   bash benchmarks/run_gpu_suite.sh OUT_DIR
#
# Steps (QK_STEPS, space-separated, default all, in this order):
#   tests         pytest -m gpu            -> gpu_tests.log (a failure is logged, the suite goes on)
#   gemm          benchmarks.gemm, eager   (every backend + torchao/bitsandbytes/diffusers)
#   gemm-compile  torch.compile'd torchao and bf16 at M in QK_COMPILE_M (default 256,4096,16384)
#   accuracy      benchmarks.accuracy      (Linear cases K=N=3072, 'small' demo block and model)
#   e2e           benchmarks.e2e, eager    full-width, QK_BLOCKS blocks (default 8), 1024x1024
#                                          + one reference image (~8,400 tokens)
#   e2e-compile   the same, torch.compile'd torchao and bf16
#
# OUT_DIR gets at most 8 files, flat: results.tar.gz (every CSV/JSON/PNG/log of the run),
# summary.md (make_readme_table), results.csv (all rows of all steps), gemm.png, accuracy.png,
# e2e.png, suite.log and gpu_tests.log. The tarball is rebuilt after each step, so a run cut
# short still returns what it finished. A full run takes ~15-25 min on an H100; to stay under a
# 10-minute limit per command, split it: QK_STEPS="tests gemm", then "gemm-compile accuracy",
# then "e2e e2e-compile", each with its own OUT_DIR.
#
# Environment: PYTHON (default python3 from PATH; wheels on PYTHONPATH are fine, nothing is
# installed here), QK_BLOCKS, QK_COMPILE_M, QK_GEMM_ARGS / QK_ACC_ARGS / QK_E2E_ARGS (extra flags),
# QK_DRY_RUN=1 (every step with --quick on CPU-sized inputs: checks the plumbing anywhere).
set -uo pipefail

OUT_DIR=${1:?usage: run_gpu_suite.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
STEPS=${QK_STEPS:-"tests gemm gemm-compile accuracy e2e e2e-compile"}
BLOCKS=${QK_BLOCKS:-8}
COMPILE_M=${QK_COMPILE_M:-256,4096,16384}
DRY=${QK_DRY_RUN:-0}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qk-suite.XXXXXX")
mkdir -p "$WORK/logs"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# Never let a library reach for a hub: everything here is built locally.
export HF_HUB_OFFLINE=1

QUICK=()
E2E_SHAPE=(--blocks "$BLOCKS" --height 1024 --width 1024 --reference)
if [ "$DRY" != "0" ]; then
  QUICK=(--quick)
  E2E_SHAPE=(--reference)
  COMPILE_M=17
  echo "[suite] QK_DRY_RUN=$DRY: every step runs with --quick"
fi

log() { echo "[suite $(date -u +%H:%M:%S)] $*" | tee -a "$WORK/logs/suite.log"; }

FAILED=()
step() {  # step NAME CMD...: run, tee its log, record failure, never stop the suite
  local name=$1; shift
  log "start $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$WORK/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  log "end $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$name" = tests ] && [ "$rc" -eq 5 ]; then
    log "tests: pytest collected no gpu-marked test (exit 5), not counted as a failure"
  elif [ "$rc" -ne 0 ]; then
    FAILED+=("$name(exit $rc)")
  fi
  bundle
}

bundle() {  # refresh OUT_DIR from WORK: tarball + the few flat summary files
  cp "$WORK/logs/suite.log" "$OUT_DIR/suite.log" 2>/dev/null
  [ -f "$WORK/logs/tests.log" ] && cp "$WORK/logs/tests.log" "$OUT_DIR/gpu_tests.log"
  for f in gemm accuracy e2e; do
    [ -f "$WORK/$f/$f.png" ] && cp "$WORK/$f/$f.png" "$OUT_DIR/$f.png"
  done
  "$PYTHON" -m benchmarks.make_readme_table "$WORK" --out "$OUT_DIR/summary.md" --csv "$OUT_DIR/results.csv" \
    >/dev/null 2>>"$WORK/logs/suite.log" || true
  tar -czf "$OUT_DIR/results.tar.gz.tmp" -C "$WORK" . && mv "$OUT_DIR/results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
}

log "out $OUT_DIR, work $WORK, steps: $STEPS"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$WORK/logs/suite.log"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for m in ("triton", "diffusers", "torchao", "bitsandbytes", "cupy", "matplotlib"):
    print(f"  {m}: {'installed' if importlib.util.find_spec(m) else 'not installed'}")
EOF
"$PYTHON" -m qkernels 2>&1 | tee -a "$WORK/logs/suite.log"

for s in $STEPS; do
  case $s in
    tests)
      step tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests ;;
    gemm)
      # shellcheck disable=SC2086
      step gemm "$PYTHON" -m benchmarks.gemm --out "$WORK/gemm" --no-compile-peers "${QUICK[@]}" ${QK_GEMM_ARGS:-} ;;
    gemm-compile)
      # shellcheck disable=SC2086
      step gemm-compile "$PYTHON" -m benchmarks.gemm --out "$WORK/gemm-compile" --compile-peers "${QUICK[@]}" \
        --m "$COMPILE_M" --only bf16+compile,torchao-int8-dynamic+compile,torchao-fp8-rowwise+compile \
        ${QK_GEMM_ARGS:-} ;;
    accuracy)
      # shellcheck disable=SC2086
      step accuracy "$PYTHON" -m benchmarks.accuracy --out "$WORK/accuracy" "${QUICK[@]}" ${QK_ACC_ARGS:-} ;;
    e2e)
      # shellcheck disable=SC2086
      step e2e "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e" --no-compile-peers "${E2E_SHAPE[@]}" "${QUICK[@]}" \
        ${QK_E2E_ARGS:-} ;;
    e2e-compile)
      # shellcheck disable=SC2086
      step e2e-compile "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e-compile" --compile-peers "${E2E_SHAPE[@]}" \
        "${QUICK[@]}" --only bf16+compile,torchao-int8-dynamic+compile,torchao-fp8-rowwise+compile \
        ${QK_E2E_ARGS:-} ;;
    *)
      log "unknown step '$s' (known: tests gemm gemm-compile accuracy e2e e2e-compile)"; FAILED+=("$s(unknown)") ;;
  esac
done

if [ ${#FAILED[@]} -eq 0 ]; then
  log "done: all steps exited 0; results in $OUT_DIR"
else
  log "done with failures: ${FAILED[*]}; results in $OUT_DIR"
fi
bundle
rm -rf "$WORK"
[ ${#FAILED[@]} -eq 0 ]
