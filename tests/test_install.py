"""`pip install` without CUDA: the path of a user with no toolkit (or a CPU-only torch).

From a source distribution built out of a clean copy of this checkout (so no build/ or in-place
_C from an earlier CUDA build can leak in): the sdist holds every csrc/ file a CUDA build needs;
a wheel built from it with no CUDA toolkit says why it has no kernels, holds no `_C`, and once
installed imports, explains the missing extension, and computes the reference's result.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# What a clean checkout holds; build outputs and environments stay behind.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                 ".pytest_cache", "bench-results", "gpu-results")


def _run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """The unpacked sdist of a clean copy of the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "checkout"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    env = {**os.environ, "COMPACTER_KERNELS_SKIP_CUDA_BUILD": "1"}
    env.pop("COMPACTER_KERNELS_FORCE_CUDA_BUILD", None)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src, env=env)
    (archive,) = (tmp / "dist").glob("compacter_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (tree,) = (tmp / "unpacked").iterdir()
    return tree


def test_sdist_holds_every_source_a_cuda_build_needs(sdist_tree):
    for rel in ("setup.py", "pyproject.toml", "compacter_kernels/_extension.py", "compacter_kernels/bench/cli.py"):
        assert (sdist_tree / rel).is_file(), f"{rel} missing from the sdist"
    wanted = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    shipped = {p.name for p in (sdist_tree / "csrc").iterdir()}
    assert wanted and wanted <= shipped, f"csrc files missing from the sdist: {sorted(wanted - shipped)}"


def test_wheel_without_cuda_toolkit_installs_and_runs(sdist_tree, tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda-here")}
    for flag in ("COMPACTER_KERNELS_SKIP_CUDA_BUILD", "COMPACTER_KERNELS_FORCE_CUDA_BUILD", "TRITON_INTERPRET",
                 "PYTHONPATH"):
        env.pop(flag, None)
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                "-w", str(tmp_path / "wheels"), str(sdist_tree)], cwd=tmp_path, env=env)
    why = "nvcc was not found" if torch.version.cuda else "is a CPU-only build"
    assert "installed WITHOUT its CUDA kernels" in log and why in log, log[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("compacter_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compacter_kernels/functional.py" in names
    assert not [n for n in names if "/_C" in n], f"a no-CUDA wheel holds an extension: {names}"

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
         cwd=tmp_path, env=env)
    check = f"""
import torch, compacter_kernels as ck
from compacter_kernels import _extension, reference
assert ck.__file__.startswith({str(site)!r}), ck.__file__
ok, why = _extension.status()
assert not ok and "not built" in why, why
torch.manual_seed(0)
d, k, n = 32, 8, 4
x = torch.randn(5, d, dtype=torch.float64)
args = [torch.randn(n, n, n), torch.randn(n, d // n, 1), torch.randn(n, 1, k // n), torch.randn(k),
        torch.randn(n, n, n), torch.randn(n, k // n, 1), torch.randn(n, 1, d // n), torch.randn(d)]
args = [a.double() for a in args]
torch.testing.assert_close(ck.compacter_adapter(x, *args), reference.compacter_adapter(x, *args), rtol=0, atol=0)
try:
    ck.compacter_adapter(x, *args, backend="cuda")
except RuntimeError as e:
    assert "not built" in str(e), e
else:
    raise AssertionError("backend='cuda' ran without its extension")
print("OK")
"""
    # -S: no .pth files, so a development checkout's editable install cannot supply the package
    # (or its _C); torch comes from this interpreter's site-packages, after the installed wheel.
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    out = _run([sys.executable, "-S", "-c", check], cwd=tmp_path, env={**env, "PYTHONPATH": path})
    assert "OK" in out
