#!/usr/bin/env bash
# Batched runs for a lent GPU machine (device time is scarce: few, full calls).
# That machine reaches no registry; its python3 already has torch, triton, pytest, pytest-xdist,
# hypothesis, pytest-benchmark and matplotlib. Each step builds the CUDA extension in place for
# the local GPU (incremental on a machine still warm from the last call), then runs. Everything
# lands in $OUT (default gpu-results/): env.txt, build.log, the step's log, the bench JSON/CSV/MD
# (no PNGs: a device command returns at most 8 files; draw them from the JSON with
# `compacter-bench --plot-json <run>.json`).
# Usage (from the repo root): COMPACTER_KERNELS_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh STEP [ARGS]
# (ARGS go to pytest for tests and sanitize, to the script for tune)
# STEP, in the order to run them, one device command each (10 minutes at most):
#   tests     the whole suite on the GPU (tests.log)
#   sanitize  the cuda backend's kernel-path and dense-adapter tests under compute-sanitizer's four tools
#   targets   `compacter-bench --preset targets`: the sizes the performance targets are judged at,
#             with the verdicts in <run>-targets.md
#   bench     the full sweep, interrupted (and reported) after $BENCH_SECONDS (540)
#   tune      scripts/tune_triton_blocks.py: the Triton block-size candidates timed at M = 32768
#   all       tests, targets and bench in one command (default; on a lent machine use the steps:
#             together they write more than the 8 files a device command returns)
set -uo pipefail
STEP=${1:-all}; shift || true
case "$STEP" in all|tests|sanitize|targets|bench|tune) ;; *) echo "unknown step '$STEP' (all|tests|sanitize|targets|bench|tune)"; exit 2;; esac
cd "$(dirname "$0")/.."
# The in-place build is not installed: the checkout goes on the path of every Python started here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-8}
{
  date -u +%FT%TZ
  echo "commit: ${COMPACTER_KERNELS_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build (in place)"
start=$(date +%s)
if ! COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

tests_rc=0
if [ "$STEP" = sanitize ]; then
  # No caching allocator: each tensor is its own allocation, so memcheck sees every overrun.
  # Each tool within $SANITIZE_SECONDS (120), so that all four fit one 10-minute device command.
  for tool in memcheck racecheck synccheck initcheck; do
    echo "== compute-sanitizer --tool $tool" | tee -a "$OUT/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_SECONDS:-120}" compute-sanitizer --tool "$tool" \
      --error-exitcode 1 "$PY" -m pytest tests/test_houlsby_adapter.py -q -p no:cacheprovider -k "cuda and (paths or dense)" \
      "$@" >> "$OUT/sanitize.log" 2>&1 || { rc=$?; tests_rc=1; echo "$tool FAILED or timed out (exit code $rc)"; }
  done
  tail -20 "$OUT/sanitize.log"
  exit "$tests_rc"
fi
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
  echo "== tests"
  # Spread over processes when pytest-xdist is there (the GPU image has it): most of the suite's
  # time on a GPU should be Triton compiling kernel specialisations, CPU work (not yet measured).
  workers=()
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
  COMPACTER_KERNELS_REQUIRE_EXTENSION=1 "$PY" -m pytest tests -q -p no:cacheprovider "${workers[@]}" "$@" 2>&1 \
    | tee "$OUT/tests.log" | tail -30
  tests_rc=${PIPESTATUS[0]}
  echo "tests exit code: $tests_rc"
fi

if [ "$STEP" = all ] || [ "$STEP" = targets ]; then
  echo "== benchmark: the sizes the performance targets are set at"
  "$PY" -m compacter_kernels.bench --preset targets --no-plot --out "$OUT" 2>&1 | tee "$OUT/targets.log" | tail -80
fi
if [ "$STEP" = tune ]; then
  echo "== Triton block sizes, timed"
  "$PY" scripts/tune_triton_blocks.py --seconds "${TUNE_SECONDS:-480}" "$@" 2>&1 | tee "$OUT/tune.log" | tail -80
  exit "${PIPESTATUS[0]}"
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
  # SIGINT before the device's 10-minute limit: the command then reports what it measured.
  echo "== benchmark: the full sweep (stopped after ${BENCH_SECONDS:=540} s)"
  timeout -s INT "$BENCH_SECONDS" "$PY" -m compacter_kernels.bench --no-plot --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | tail -60
fi
exit "$tests_rc"
