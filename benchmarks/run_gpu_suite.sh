#!/usr/bin/env bash
# The GPU test and benchmark suite in one command, inside one time budget:
#
#   bash benchmarks/run_gpu_suite.sh OUT_DIR
#
# Steps (QK_STEPS, space-separated, run in the order given; default all, most important first):
#   tests         pytest -m gpu            -> gpu_tests.log (a failure is logged, the suite goes on)
#   gemm          benchmarks.gemm, eager   every backend + torchao/bitsandbytes/diffusers, M in QK_GEMM_M
#   e2e           benchmarks.e2e, eager    full-width, QK_BLOCKS blocks (default 6), 1024x1024
#                                          + one reference image (~8,400 tokens)
#   host          benchmarks.host_overhead host us per forward at M = 1, 16, 256
#   accuracy      benchmarks.accuracy      Linear cases K=N=3072, 'small' demo block and model
#   e2e-compile   the e2e model at QK_COMPILE_BLOCKS blocks (default 2; compile time grows with the
#                 blocks): bf16, torchao int8/fp8 and fp8-triton under torch.compile, fp8-triton eager
#   gemm-compile  torch.compile'd torchao and bf16 at M in QK_COMPILE_M (default 4096,16384)
#   e2e60         the real 60 blocks (41 GB bf16), Edit-2511 modulation, 1024x1024 + reference and
#                 512x512 + reference: bf16, fp8-triton unfused / fused / fused + CUDA graphs, bf16
#                 + graphs, with the profiler's GPU time by kind (--profile)
#   e2e60-compile the same 60 blocks at 8,400 tokens, compiled block by block: bf16 and torchao fp8
#                 rowwise (the peers to beat), against the fused eager path
#
# Not every step fits one 10-minute call any more; a full run is three calls, each with its own
# OUT_DIR:  QK_STEPS="tests host accuracy" | QK_STEPS="gemm e2e" (QK_STEP_CAPS="gemm=300") |
# QK_STEPS="e2e60 e2e60-compile" (QK_STEP_CAPS="e2e60=300").
#
# Time: QK_BUDGET_S (default 540) bounds the whole run from the script's start (wheel installs
# included), leaving a 10-minute command limit room for a stopped step's last writes. Each step
# runs under `timeout` with what is left; at the limit it gets SIGINT, writes the rows it
# measured and the suite moves on (logged as "cut"); a step that would start with under 30 s
# left is skipped (logged); QK_STEP_CAPS caps single steps (default "tests=200 gemm=150 e2e=120
# host=45 accuracy=60", the compile steps take what is left). Every step's duration is in suite.log. Triton's autotuning results are cached on disk (TRITON_CACHE_AUTOTUNING=1), so
# shapes tuned by one step are not tuned again by the next.
#
# Packages missing on the GPU machine: QK_WHEELS=DIR installs DIR/*.whl (no index, no deps) into
# a private folder put first on PYTHONPATH; benchmarks/fetch_peer_wheels.sh DIR downloads them.
#
# OUT_DIR gets at most 8 files, flat: results.tar.gz (every CSV/JSON/PNG/log of the run),
# summary.md (make_readme_table), results.csv (all rows of all steps), gemm.png, accuracy.png,
# e2e.png, suite.log and gpu_tests.log. The tarball is rebuilt after each step, so a run cut short
# still returns what it finished.
#
# Environment: PYTHON (default python3 from PATH), QK_BUDGET_S, QK_BLOCKS, QK_COMPILE_BLOCKS,
# QK_GEMM_M, QK_COMPILE_M, QK_GEMM_ARGS / QK_ACC_ARGS / QK_E2E_ARGS / QK_HOST_ARGS (extra flags),
# QK_WHEELS, QK_DRY_RUN=1 (every step with --quick on CPU-sized inputs: checks the plumbing anywhere).
set -uo pipefail

OUT_DIR=${1:?usage: run_gpu_suite.sh OUT_DIR}
START=$SECONDS  # the budget counts from here: wheel installs and start-up included
PYTHON=${PYTHON:-python3}
STEPS=${QK_STEPS:-"tests gemm e2e host accuracy e2e-compile gemm-compile"}
BUDGET=${QK_BUDGET_S:-540}
MIN_STEP_S=30
# Per-step caps, so one slow step cannot starve the ones after it (compile steps get what is left).
STEP_CAPS=${QK_STEP_CAPS:-"tests=200 gemm=150 e2e=120 host=45 accuracy=60"}
BLOCKS=${QK_BLOCKS:-6}
COMPILE_BLOCKS=${QK_COMPILE_BLOCKS:-2}
GEMM_M=${QK_GEMM_M:-16,256,4096,8192,16384}
COMPILE_M=${QK_COMPILE_M:-4096,16384}
DRY=${QK_DRY_RUN:-0}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qk-suite.XXXXXX")
mkdir -p "$WORK/logs"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_AUTOTUNING=1
# Never let a library reach for a hub: everything here is built locally.
export HF_HUB_OFFLINE=1

log() { echo "[suite $(date -u +%H:%M:%S)] $*" | tee -a "$WORK/logs/suite.log"; }

if [ -n "${QK_WHEELS:-}" ]; then
  if ls "$QK_WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$QK_WHEELS"/*.whl 2>&1 | tail -3
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    log "installed $(ls "$QK_WHEELS"/*.whl | wc -l) wheels from $QK_WHEELS"
  else
    log "QK_WHEELS=$QK_WHEELS holds no .whl files: peers that are not installed are reported so"
  fi
fi

QUICK=()
HOST_QUICK=()
E2E_SHAPE=(--blocks "$BLOCKS" --height 1024 --width 1024 --reference)
COMPILE_SHAPE=(--blocks "$COMPILE_BLOCKS" --height 1024 --width 1024 --reference)
if [ "$DRY" != "0" ]; then
  QUICK=(--quick)
  HOST_QUICK=(--shapes 96x128 --m 16 --reps 20)
  E2E_SHAPE=(--reference)
  COMPILE_SHAPE=(--reference)
  GEMM_M=1,17
  COMPILE_M=17
  echo "[suite] QK_DRY_RUN=$DRY: every step runs with --quick"
fi

FAILED=()
cap_of() {  # the step's own cap in seconds from QK_STEP_CAPS ("name=seconds ..."), else none
  local pair
  for pair in $STEP_CAPS; do
    [ "${pair%%=*}" = "$1" ] && { echo "${pair#*=}"; return; }
  done
  echo 999999
}

step() {  # step NAME CMD...: run under the time left, tee its log, record failure, never stop the suite
  local name=$1; shift
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    log "skip $name: ${left} s left of the ${BUDGET} s budget"
    FAILED+=("$name(skipped: budget)")
    return
  fi
  local cap limit=$left
  cap=$(cap_of "$name")
  [ "$cap" -lt "$limit" ] && limit=$cap
  log "start $name (limit ${limit} s, ${left} s left): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  log "end $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$name" = tests ] && [ "$rc" -eq 5 ]; then
    log "tests: pytest collected no gpu-marked test (exit 5), not counted as a failure"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]; then
    log "$name: cut at its time limit; the rows it measured are kept"
    FAILED+=("$name(cut at its time limit)")
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
  tar -czf "$OUT_DIR/results.tar.gz.tmp" -C "$WORK" --exclude=./site . \
    && mv "$OUT_DIR/results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
}

log "out $OUT_DIR, work $WORK, steps: $STEPS, budget ${BUDGET} s"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$WORK/logs/suite.log"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for m in ("triton", "diffusers", "torchao", "bitsandbytes", "cupy", "matplotlib"):
    print(f"  {m}: {'installed' if importlib.util.find_spec(m) else 'not installed'}")
EOF
"$PYTHON" -m qkernels 2>&1 | tee -a "$WORK/logs/suite.log"

COMPILED=bf16+compile,torchao-int8-dynamic+compile,torchao-fp8-rowwise+compile
for s in $STEPS; do
  case $s in
    tests)
      step tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests ;;
    gemm)
      # shellcheck disable=SC2086
      step gemm "$PYTHON" -m benchmarks.gemm --out "$WORK/gemm" --no-compile-peers --m "$GEMM_M" "${QUICK[@]}" \
        ${QK_GEMM_ARGS:-} ;;
    e2e)
      # shellcheck disable=SC2086
      step e2e "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e" --no-compile-peers "${E2E_SHAPE[@]}" "${QUICK[@]}" \
        ${QK_E2E_ARGS:-} ;;
    host)
      # shellcheck disable=SC2086
      step host "$PYTHON" -m benchmarks.host_overhead --out "$WORK/host" "${HOST_QUICK[@]}" ${QK_HOST_ARGS:-} ;;
    accuracy)
      # shellcheck disable=SC2086
      step accuracy "$PYTHON" -m benchmarks.accuracy --out "$WORK/accuracy" "${QUICK[@]}" ${QK_ACC_ARGS:-} ;;
    e2e-compile)
      # shellcheck disable=SC2086
      step e2e-compile "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e-compile" --compile-peers --compile-ours \
        "${COMPILE_SHAPE[@]}" "${QUICK[@]}" --only "$COMPILED,fp8-triton,fp8-triton+compile" ${QK_E2E_ARGS:-} ;;
    gemm-compile)
      # shellcheck disable=SC2086
      step gemm-compile "$PYTHON" -m benchmarks.gemm --out "$WORK/gemm-compile" --compile-peers "${QUICK[@]}" \
        --m "$COMPILE_M" --only "$COMPILED" ${QK_GEMM_ARGS:-} ;;
    e2e60)
      for hw in 1024 512; do
        # shellcheck disable=SC2086
        step "e2e60-$hw" "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e60-$hw" --no-peers --blocks 60 --reference \
          --zero-cond-t --height $hw --width $hw --reps 5 --warmup 1 --no-load --profile "${QUICK[@]}" \
          --only bf16,bf16+graphs,fp8-triton,fp8-triton+fused,fp8-triton+fused+graphs ${QK_E2E_ARGS:-}
      done ;;
    e2e60-compile)
      # shellcheck disable=SC2086
      step e2e60-compile "$PYTHON" -m benchmarks.e2e --out "$WORK/e2e60-compile" --compile-peers --blocks 60 \
        --reference --zero-cond-t --reps 5 --warmup 1 --no-load "${QUICK[@]}" \
        --only bf16+compile,torchao-fp8-rowwise+compile,fp8-triton+fused ${QK_E2E_ARGS:-} ;;
    *)
      log "unknown step '$s' (known: tests gemm e2e host accuracy e2e-compile gemm-compile e2e60 e2e60-compile)"
      FAILED+=("$s(unknown)") ;;
  esac
done

log "total $((SECONDS - START)) s of the ${BUDGET} s budget"
if [ ${#FAILED[@]} -eq 0 ]; then
  log "done: all steps exited 0; results in $OUT_DIR"
else
  log "done with failures: ${FAILED[*]}; results in $OUT_DIR"
fi
bundle
rm -rf "$WORK"
[ ${#FAILED[@]} -eq 0 ]
