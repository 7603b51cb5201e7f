#!/usr/bin/env bash
# Sets up a fresh machine and runs the tests (the README's test command; CI runs it too):
#   1. a virtual environment (.venv, or $VENV) with a CUDA build of torch and the test tools;
#   2. the package built WITH its CUDA extension (a broken CUDA build fails here);
#   3. a check that the extension imports and matches the sources;
#   4. pytest over tests/ (Triton kernels run in the CPU interpreter when there is no GPU);
#   5. without a GPU, a second pytest run with the cuda backend's kernels in the CPU emulator
#      (tests/emulation.py: a process of its own, as it registers CPU kernels for the CUDA ops).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k kernels -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"

echo "== installing torch (CUDA build) and the build/test tools into $VENV"
"$PY" -m pip install -q --upgrade pip
# Unpinned torch: the newest CUDA build from PyPI (a torch already there is kept).
"$PY" -m pip install -q torch ninja pybind11 "setuptools>=64" wheel \
    pytest pytest-benchmark hypothesis numpy matplotlib
# Optional integrations (AdapterHub, transformers): their tests skip without them.
"$PY" -m pip install -q "adapters>=1.3.0" || echo "WARNING: could not install adapters; its tests will skip"

echo "== building compacter_kernels with its CUDA extension"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "== CUDA extension built in $(( $(date +%s) - start )) s"
"$PY" - <<'PY'
from compacter_kernels import _extension
ok, why = _extension.status()
assert ok, f"the CUDA extension does not load: {why}"
print("== CUDA extension:", why)
PY

echo "== running the tests"
COMPACTER_KERNELS_REQUIRE_EXTENSION=1 "$PY" -m pytest tests -q -rs -p no:cacheprovider "$@"

if "$PY" -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then
    echo "== no GPU: running the cuda backend's kernels in the CPU emulator"
    # Every op's file (tests/test_<op>.py, the checks of tests/op_checks.py included), the ops
    # together, hardening, memory, the emulator's own tests and the compiled model.
    COMPACTER_KERNELS_EMULATE_CUDA=1 "$PY" -m pytest tests/test_compacter_adapter.py tests/test_houlsby_adapter.py \
        tests/test_phm_linear.py tests/test_multitask_adapters.py tests/test_composition.py tests/test_hardening.py \
        tests/test_memory.py tests/test_cuda_emulation.py tests/test_compile_models.py -q -rs -p no:cacheprovider "$@"
fi
