#!/usr/bin/env bash
# The tests at the oldest declared versions (setup.py: torch>=2.6), as a user with an older install
# would run the package; CI runs it after scripts/test.sh:
#   1. a virtual environment (.venv-oldest, or $VENV) with torch 2.6.0 from PyPI, the Triton it
#      ships (3.2) and the test tools; numpy<2.4 because Triton<3.7's interpreter breaks under
#      numpy>=2.4 (a pin of the test set-up only, not of the package);
#   2. a clean copy of the checkout (no build/, no in-place _C of another torch), installed as the
#      README says (`pip install --no-build-isolation ".[bench]"`, not forced): torch 2.6.0's wheel
#      is built for CUDA 12.4, so with a CUDA 13 toolkit it installs WITHOUT its extension and
#      says why; a check that the installed torch was kept and the extension is reported missing;
#   3. pytest over tests/ in that copy (Triton kernels in the CPU interpreter without a GPU; what
#      needs the extension skips with the reason), scripts/gpu_quick.sh --dry-run included
#      (tests/test_scripts.py) and the compile sweep with Triton 3.2's compiler
#      (tests/test_triton_compile.py). Left out: the CUDA emulator run (no extension here).
# Extra arguments go to pytest, e.g. `bash scripts/test_oldest.sh -k multitask -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TORCH=2.6.0  # the lower end of setup.py's torch range (tests/test_install.py checks they agree)

VENV=${VENV:-.venv-oldest}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$(cd "$VENV" && pwd)/bin/python"
start=$(date +%s)

echo "== installing torch $OLDEST_TORCH (and the Triton it ships) and the test tools into $VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==$OLDEST_TORCH" "numpy<2.4" ninja "setuptools>=64" wheel \
    pytest pytest-benchmark hypothesis matplotlib

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude='*.so' --exclude=__pycache__ --exclude=.pytest_cache --exclude=./bench-results \
    --exclude=./gpu-results . | tar -xf - -C "$SRC"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)

echo "== installing compacter_kernels from a clean copy, as the README says (not forced)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
(cd "$SRC" && env -u COMPACTER_KERNELS_FORCE_CUDA_BUILD -u COMPACTER_KERNELS_SKIP_CUDA_BUILD \
    "$PY" -m pip install -v --no-build-isolation ".[bench]" > "$SRC/install.log" 2>&1) \
    || { tail -50 "$SRC/install.log"; exit 1; }
WARNED=$(grep -o "WARNING: compacter_kernels is installed WITHOUT.*" "$SRC/install.log" || true)
echo "== pip: ${WARNED:-no WARNING line}"
(cd /tmp && "$PY" - "$OLDEST_TORCH" "$WARNED" <<'PY'
import sys, torch, triton, numpy
from compacter_kernels import _extension
assert torch.__version__.split("+")[0] == sys.argv[1], f"the install replaced torch {sys.argv[1]}: {torch.__version__}"
ok, why = _extension.status()
assert ok or sys.argv[2], f"installed without the extension ({why}) and pip's log does not say why"
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}")
print("== CUDA extension:", why)
PY
)
echo "== set up in $(( $(date +%s) - start )) s"

echo "== running the tests (torch $OLDEST_TORCH); left out: the CUDA emulator run (no extension)"
cd "$SRC"
# The numpy deprecation Triton 3.2's interpreter triggers on every kernel (numpy<2.4 keeps it a warning): not shown.
COMPACTER_KERNELS_COMMIT=$COMMIT COMPACTER_KERNELS_REQUIRE_EXTENSION=0 "$PY" -m pytest tests -q -rs \
    -p no:cacheprovider -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" "$@"
echo "== oldest-versions run took $(( $(date +%s) - start )) s"
