#!/usr/bin/env bash
# One batched run for a lent GPU machine (device time is scarce: one call does it all).
# That machine reaches no registry; its python3 already has torch, triton, pytest, hypothesis,
# pytest-benchmark and matplotlib. This builds the CUDA extension in place for the local GPU,
# runs the whole test suite on the GPU, then the full benchmark sweep. Everything lands in
# $OUT (default gpu-results/): env.txt, build.log, tests.log, bench.log and the bench JSON/CSV/PNG.
# Usage (from the repo root): COMPACTER_KERNELS_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh [all|tests|bench|sanitize] [pytest args]
# (tests and bench apart when one 10-minute command cannot hold both). `sanitize` runs the cuda
# backend's kernel-path and dense-adapter tests under compute-sanitizer's four tools, into sanitize.log.
set -uo pipefail
STEP=${1:-all}; shift || true
cd "$(dirname "$0")/.."
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
  for tool in memcheck racecheck synccheck initcheck; do
    echo "== compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -k "cuda and (paths or dense)" "$@" \
      >> "$OUT/sanitize.log" 2>&1 || { tests_rc=1; echo "$tool FAILED"; }
  done
  tail -20 "$OUT/sanitize.log"
  exit "$tests_rc"
fi
if [ "$STEP" != bench ]; then
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

if [ "$STEP" != tests ]; then
  echo "== benchmark"
  "$PY" -m compacter_kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit "$tests_rc"
