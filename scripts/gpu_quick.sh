#!/usr/bin/env bash
# One device command that validates both backends and measures the targets within a hard
# deadline (default 480 s), always leaving what it measured in at most 8 files under $OUT:
#   summary.txt   GPU, driver, versions, commit, date; then each stage: its time, cap and result
#   build.log     the build's last 200 lines
#   tests.log     the kernel tests of both backends (fp32, fp16, bf16), counters included
#   sanitize.log  compute-sanitizer memcheck of the cuda kernels (resident and streamed rows, odd M)
#   bench.log     what the two benchmarks printed
#   targets.json  compacter-bench --preset targets (triton, cuda, eager, compile, floor)
#   targets.md    its verdicts
#   e2e.json      a BERT-base training step, reference against fused, with host time per step
# Stages run in order of value, each within its own cap and what is left of the deadline; a
# stage that runs out is interrupted (SIGINT: pytest and compacter-bench report what they did).
#
#   COMPACTER_KERNELS_COMMIT=$(git rev-parse HEAD) OUT=$OUT bash scripts/gpu_quick.sh
#   bash scripts/gpu_quick.sh --dry-run      # the same stages on tiny sizes, on a CPU (CI runs it)
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${QUICK_SECONDS:-480} ))
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${COMPACTER_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "mode: $([ $DRY = 1 ] && echo 'dry run (tiny sizes, CPU)' || echo 'GPU run')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
  echo "stages (seconds taken / cap, result):"
} > "$SUMMARY"
cat "$SUMMARY"

# stage NAME CAP LOG CMD...: runs CMD within min(CAP, time left), output to LOG; one summary line.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    echo "  $name: not run, the deadline has passed" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at most $cap s)"
  local start rc
  start=$(date +%s)
  timeout -s INT -k 15 "$cap" "$@" >> "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start )) result="ok"
  [ "$rc" -ne 0 ] && result="exit code $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] && result="interrupted at its cap (exit code $rc)"
  echo "  $name: ${took} s / ${cap} s, $result" | tee -a "$SUMMARY"
  tail -5 "$log"
  return 0
}

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 COMPACTER_KERNELS_EMULATE_CUDA=0
  TESTS=(tests/test_compacter_adapter.py tests/test_houlsby_adapter.py tests/test_counts.py -k "compacter_adapter_matches_reference and dtype0-48-24-4-1 or launch_budget and d64 or kernel_paths and 45")
  BENCH=(--preset quick --m 16 --ops compacter --modes fwd --providers triton,cuda,reference,floor)
  E2E=(--layers 1 --batch 1 --seq 8 --steps 1)
else
  # The per-op files but their hypothesis draws (minutes, and CI runs them): within the stage's cap.
  TESTS=(tests/test_compacter_adapter.py tests/test_houlsby_adapter.py tests/test_phm_linear.py
         tests/test_multitask_adapters.py tests/test_composition.py tests/test_counts.py tests/test_memory.py
         -k "not test_random_valid_configurations and not test_random_invalid_configurations")
  BENCH=(--preset targets --providers triton,cuda,reference,reference+compile,floor)
  E2E=(--model bert-base --steps 10)
fi

# A dry run checks the extension the test set-up built; COMPACTER_KERNELS_REQUIRE_EXTENSION=0 lets it be absent
# (scripts/test_oldest.sh: a torch built for another CUDA than the toolkit's), and the tests skip the cuda backend.
REQUIRE_EXT=1
[ $DRY = 1 ] && [ "${COMPACTER_KERNELS_REQUIRE_EXTENSION:-1}" = 0 ] && REQUIRE_EXT=0

build() {  # in place, for sm_90 only; the last 200 lines kept
  if [ $DRY = 1 ]; then  # rebuilding in place would overwrite the _C a running test process has loaded
    echo "dry run: the extension the test set-up built is checked, not rebuilt"
    "$PY" -c "from compacter_kernels import _extension; ok, why = _extension.status(); print(why); \
assert ok or $REQUIRE_EXT == 0"
    return
  fi
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace \
    > "$OUT/build.full" 2>&1
  local rc=$?
  tail -200 "$OUT/build.full"
  rm -f "$OUT/build.full"
  return $rc
}
export -f build
export DRY OUT PY REQUIRE_EXT
stage build 180 "$OUT/build.log" bash -c build

workers=()
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 16); fi
COMPACTER_KERNELS_CUDA_AUTO=1 COMPACTER_KERNELS_REQUIRE_EXTENSION=$REQUIRE_EXT \
  stage tests 170 "$OUT/tests.log" "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider -rf "${workers[@]}"

if command -v compute-sanitizer > /dev/null && [ $DRY = 0 ]; then
  # No caching allocator: each tensor is its own allocation, so memcheck sees every overrun.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage sanitize 60 "$OUT/sanitize.log" compute-sanitizer --tool memcheck \
    --error-exitcode 1 "$PY" -m pytest tests/test_houlsby_adapter.py -q -p no:cacheprovider -k "cuda and paths"
else
  stage sanitize 60 "$OUT/sanitize.log" bash -c "echo 'compute-sanitizer: $(command -v compute-sanitizer || echo none) \
(no GPU in a dry run): memcheck not run'"
fi

bench_dir=$(mktemp -d)
stage targets 110 "$OUT/bench.log" "$PY" -m compacter_kernels.bench "${BENCH[@]}" --no-plot --out "$bench_dir"
# --no-compile: compiling a 12-layer model three times would not fit the stage's cap.
stage e2e 45 "$OUT/bench.log" "$PY" -m compacter_kernels.bench --e2e "${E2E[@]}" --no-compile \
  --providers reference,triton,cuda --out "$bench_dir"
# Keep the JSON and the verdicts under fixed names (the CSV repeats the JSON: left out, 8 files at most).
for f in "$bench_dir"/compacter-bench-*.json; do [ -e "$f" ] && cp "$f" "$OUT/targets.json"; done
for f in "$bench_dir"/compacter-bench-*-targets.md; do [ -e "$f" ] && cp "$f" "$OUT/targets.md"; done
for f in "$bench_dir"/compacter-e2e-*.json; do [ -e "$f" ] && cp "$f" "$OUT/e2e.json"; done
rm -rf "$bench_dir"
echo "total: $(( $(date +%s) - DEADLINE + ${QUICK_SECONDS:-480} )) s of ${QUICK_SECONDS:-480} s" | tee -a "$SUMMARY"
ls "$OUT"
