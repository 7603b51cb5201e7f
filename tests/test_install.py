"""`pip install` without CUDA: the path of a user with no toolkit (or a CPU-only torch).

From a source distribution built out of a clean copy of this checkout (so no build/ or in-place
_C from an earlier CUDA build can leak in): the sdist holds every csrc/ file a CUDA build needs;
a wheel built from it with no CUDA toolkit says why it has no kernels, holds no `_C`, and once
installed imports, explains the missing extension, and computes the reference's result.

No CUDA problem fails a plain install (fake toolkits, so no real compile runs): a toolkit whose CUDA
major version differs from torch's, or an extension build that fails, gives a wheel without `_C` and
one WARNING line saying why; COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 turns each into a failed build.
"""
import os
import re
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
IGNORED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                 ".pytest_cache", "bench-results", "gpu-results")


needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch has no CUDA version to mismatch")
# A toolkit CUDA major version other than torch's.
OTHER_CUDA = "12.4" if (torch.version.cuda or "").startswith("11.") else "11.8"
WITHOUT_KERNELS = "installed WITHOUT its CUDA kernels"


def _run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _git(cwd, *args):
    return _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd).strip()


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """The unpacked sdist of a clean copy of the checkout (a git checkout of its own, like a clone)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "checkout"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    if shutil.which("git"):
        _git(src, "init", "-q")
        _git(src, "add", "-A")
        _git(src, "commit", "-q", "-m", "clean copy")
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


def _commit_of(sdist_tree):
    """The commit of the clean copy the sdist was made from (None without git)."""
    copy = sdist_tree.parent.parent / "checkout"
    return _git(copy, "rev-parse", "HEAD") if (copy / ".git").exists() else None


def _fake_toolkit(root, release):
    """A CUDA_HOME whose nvcc reports CUDA `release` and refuses to compile anything."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\nif [ "$1" = --version ] || [ "$1" = -V ]; then\n'
                    f'  echo "Cuda compilation tools, release {release}, V{release}.89"; exit 0\nfi\n'
                    'echo "fake nvcc: no compiling here" >&2; exit 1\n')
    nvcc.chmod(0o755)
    return root


def _build_env(cuda_home, force=False, **extra):
    env = {**os.environ, "CUDA_HOME": str(cuda_home), **extra}
    for flag in ("COMPACTER_KERNELS_SKIP_CUDA_BUILD", "COMPACTER_KERNELS_FORCE_CUDA_BUILD", "CUDA_PATH",
                 "TORCH_CUDA_ARCH_LIST", "PYTHONPATH"):
        env.pop(flag, None)
    if force:
        env["COMPACTER_KERNELS_FORCE_CUDA_BUILD"] = "1"
    return env


def _pip_wheel(src, out, env):
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                           "-w", str(out), str(src)], cwd=out.parent, env=env, capture_output=True, text=True)


def _warning_line(log):
    lines = [line for line in log.splitlines() if WITHOUT_KERNELS in line]
    assert len(lines) == 1, f"want one warning line, got {lines}:\n{log[-3000:]}"
    return lines[0]


def _wheel_names(out):
    (wheel,) = out.glob("compacter_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compacter_kernels/functional.py" in names
    assert not [n for n in names if "/_C" in n], f"a wheel without kernels holds an extension: {names}"
    return wheel, names


def test_sdist_and_a_clones_wheel_record_their_commit(sdist_tree, tmp_path):
    commit = _commit_of(sdist_tree)
    if commit is None:
        pytest.skip("git is not installed")
    assert (sdist_tree / "compacter_kernels" / "_build_info.py").read_text().endswith(f"GIT_COMMIT = {commit!r}\n")
    # `pip install .` in a clone (non-editable): the wheel knows the commit it was built from.
    out = tmp_path / "wheels"
    env = {**_build_env(tmp_path / "no-cuda-here"), "COMPACTER_KERNELS_SKIP_CUDA_BUILD": "1"}
    proc = _pip_wheel(sdist_tree.parent.parent / "checkout", out, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    wheel, _ = _wheel_names(out)
    assert zipfile.ZipFile(wheel).read("compacter_kernels/_build_info.py").decode().endswith(f"GIT_COMMIT = {commit!r}\n")


@needs_cuda_torch
def test_cuda_major_mismatch_installs_without_the_extension(sdist_tree, tmp_path):
    out = tmp_path / "wheels"
    proc = _pip_wheel(sdist_tree, out, _build_env(_fake_toolkit(tmp_path / "cuda", OTHER_CUDA)))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    line = _warning_line(log)
    assert f"built for CUDA {torch.version.cuda}" in line and f"is CUDA {OTHER_CUDA}" in line, line
    assert "COMPACTER_KERNELS_FORCE_CUDA_BUILD=1" in line, line  # and how to make it an error
    assert "Error compiling" not in log and "fake nvcc" not in log  # caught up front, before any build
    wheel, names = _wheel_names(out)
    commit = _commit_of(sdist_tree)
    if commit:  # a wheel built from the sdist keeps the commit the sdist recorded
        info = zipfile.ZipFile(wheel).read("compacter_kernels/_build_info.py").decode()
        assert f"GIT_COMMIT = {commit!r}" in info, info


@pytest.mark.parametrize("problem", ["no toolkit", "major mismatch"])
def test_forced_cuda_build_fails_naming_the_problem(sdist_tree, tmp_path, problem):
    if problem == "no toolkit":
        cuda_home = tmp_path / "no-cuda-here"
        why = "nvcc was not found" if torch.version.cuda else "is a CPU-only build"
    else:
        if torch.version.cuda is None:
            pytest.skip("a CPU-only torch has no CUDA version to mismatch")
        cuda_home = _fake_toolkit(tmp_path / "cuda", OTHER_CUDA)
        why = f"built for CUDA {torch.version.cuda} but the toolkit at CUDA_HOME={cuda_home} is CUDA {OTHER_CUDA}"
    out = tmp_path / "wheels"
    proc = _pip_wheel(sdist_tree, out, _build_env(cuda_home, force=True))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built" in log and why in log, \
        log[-3000:]
    assert not list(out.glob("*.whl"))


@needs_cuda_torch
def test_failed_cuda_build_installs_without_the_extension_unless_forced(sdist_tree, tmp_path):
    # A toolkit of torch's CUDA version (so no up-front reason) and host compilers that fail at once:
    # torch's compiler check or the first compile fails in seconds, as a real broken build would.
    cuda_home = _fake_toolkit(tmp_path / "cuda", torch.version.cuda)
    fail = tmp_path / "failing-cc"
    fail.write_text("#!/bin/sh\necho 'fake compiler: failing on purpose' >&2\nexit 1\n")
    fail.chmod(0o755)
    compilers = {"CC": str(fail), "CXX": str(fail), "MAX_JOBS": "1"}

    out = tmp_path / "wheels"
    proc = _pip_wheel(sdist_tree, out, _build_env(cuda_home, **compilers))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "its build failed (" in _warning_line(log)
    _wheel_names(out)

    forced = tmp_path / "forced"
    proc = _pip_wheel(sdist_tree, forced, _build_env(cuda_home, force=True, **compilers))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and WITHOUT_KERNELS not in log, log[-3000:]
    assert not list(forced.glob("*.whl"))


def _setup_min_torch():
    return re.search(r'^MIN_TORCH = "([\d.]+)"', (ROOT / "setup.py").read_text(), re.M)[1]


def test_the_declared_torch_range_is_the_tested_one():
    """setup.py's MIN_TORCH is what the metadata requires, what scripts/test_oldest.sh installs and
    what the README says."""
    low = _setup_min_torch()
    oldest = re.search(r"^OLDEST_TORCH=([\d.]+)", (ROOT / "scripts" / "test_oldest.sh").read_text(), re.M)[1]
    assert oldest.startswith(low + "."), (low, oldest)
    assert f"torch >= {low}" in (ROOT / "README.md").read_text()


def test_a_torch_older_than_the_range_installs_without_the_extension(sdist_tree, tmp_path):
    """pip replaces a torch older than MIN_TORCH after building (the metadata asks for torch>=MIN_TORCH),
    so no extension is built against it: one WARNING line says why; forced, the build fails."""
    low = _setup_min_torch()
    major, minor = map(int, low.split("."))
    old = f"{major}.{minor - 1}.1+cu124" if minor else f"{major - 1}.9.0+cu124"
    fake = tmp_path / "fake" / "torch"  # stands for the old torch: setup.py reads only these
    (fake / "utils").mkdir(parents=True)
    (fake / "__init__.py").write_text(f"import types\n__version__ = {old!r}\nversion = types.SimpleNamespace(cuda='12.4')\n")
    (fake / "utils" / "__init__.py").write_text("")
    (fake / "utils" / "cpp_extension.py").write_text("CUDA_HOME = None\n")
    why = f"the installed torch {old} is older than {low}, the oldest supported, and pip replaces it"

    out = tmp_path / "wheels"
    proc = _pip_wheel(sdist_tree, out, {**_build_env(tmp_path / "no-cuda-here"), "PYTHONPATH": str(fake.parent)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    line = _warning_line(log)
    assert why in line and f"install torch>={low} first" in line, line
    wheel, _ = _wheel_names(out)
    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    assert f"Requires-Dist: torch>={low}" in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()

    forced = tmp_path / "forced"
    proc = _pip_wheel(sdist_tree, forced, {**_build_env(tmp_path / "no-cuda-here", force=True),
                                           "PYTHONPATH": str(fake.parent)})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and why in log and WITHOUT_KERNELS not in log, log[-3000:]
