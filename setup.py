"""Build compacter_kernels, with the CUDA extension `compacter_kernels._C` when possible.

CUDA build (needs the torch you will run with, so no build isolation):

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .      # add -e for a dev checkout

No CUDA problem fails a plain install: with no toolkit, a CPU-only torch, a toolkit whose CUDA major
version differs from torch's, a failed extension build, or a torch older than the oldest supported
(MIN_TORCH: pip then replaces it, so an extension built against it would not load), the package
installs WITHOUT its extension and the build log says why in one WARNING line.

Environment switches:
    COMPACTER_KERNELS_SKIP_CUDA_BUILD=1   pure-Python install (Triton / PyTorch backends only)
    COMPACTER_KERNELS_FORCE_CUDA_BUILD=1  build the extension or fail (no fallback)
    TORCH_CUDA_ARCH_LIST                  default: "8.0;9.0+PTX" (+ the local GPUs' archs if visible)
    MAX_JOBS                              parallel compile jobs (torch's default: every core)
    NVCC_THREADS                          nvcc threads per compile job (default 2)
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).parent.resolve()
PKG = "compacter_kernels"
DEFAULT_ARCHS = ("8.0", "9.0")
INSTALL_HINT = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation ."
MIN_TORCH = "2.6"  # the oldest supported torch (scripts/test_oldest.sh tests it; README says so)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read_version():
    # Single source of truth: __version__ in the package, read without importing it (needs torch).
    text = (ROOT / PKG / "_version.py").read_text()
    return re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M).group(1)


def _source_hash():
    # Load the stdlib-only hasher by path: importing the package would import torch.
    spec = importlib.util.spec_from_file_location("_ck_source_hash", ROOT / PKG / "_source_hash.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_hash(ROOT / "csrc")


def _toolkit_version(cuda_home):
    """The toolkit's CUDA "major.minor": what its nvcc reports (torch checks the same), else version.json's."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        if m:
            return f"{m[1]}.{m[2]}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return ".".join(json.loads((Path(cuda_home) / "version.json").read_text())["cuda"]["version"].split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _cuda_unavailable_reason():
    """None when the CUDA extension can be built here, else a sentence saying why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return ("torch is not importable in the build environment (pip's build isolation hides the "
                "installed torch: pass --no-build-isolation)")
    installed = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if installed < tuple(int(v) for v in MIN_TORCH.split(".")):
        # pip replaces it with a newer torch after the build: an extension built now would not load.
        return (f"the installed torch {torch.__version__} is older than {MIN_TORCH}, the oldest supported, and pip "
                f"replaces it: install torch>={MIN_TORCH} first")
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    toolkit = _toolkit_version(CUDA_HOME)
    torch_major = torch.version.cuda.split(".")[0]
    if toolkit and toolkit.split(".")[0] != torch_major:
        # torch's build refuses a major mismatch ("The detected CUDA version ... mismatches"): say so up front.
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but the toolkit at "
                f"CUDA_HOME={CUDA_HOME} is CUDA {toolkit} (the major versions must match): install a torch built "
                f"for CUDA {toolkit.split('.')[0]}.x, or set CUDA_HOME to a CUDA {torch_major}.x toolkit")
    home = Path(CUDA_HOME)
    if not [*home.glob("include/cuda_runtime.h"), *home.glob("targets/*/include/cuda_runtime.h")]:
        # e.g. torch guessed CUDA_HOME=/usr/local from an nvcc wrapper script in /usr/local/bin.
        return (f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit root (no include/cuda_runtime.h): "
                "set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda")
    return None


def _one_line(err):
    """An exception as one short line (torch raises some logging-style: RuntimeError(format, *args))."""
    msg = str(err)
    if len(err.args) > 1 and isinstance(err.args[0], str):
        try:
            msg = err.args[0] % err.args[1:]
        except (TypeError, ValueError):
            pass
    msg = " ".join(msg.split())
    return f"{type(err).__name__}: {msg[:400]}" if msg else type(err).__name__


def _warn_without_kernels(why):
    # One line, so that it stands out in `pip install -v`'s hundreds of build lines.
    print(f"\nWARNING: compacter_kernels is installed WITHOUT its CUDA kernels: {why}. The Triton and PyTorch "
          f"backends still work. To build the kernels: {INSTALL_HINT} (COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 "
          f"makes a CUDA problem fail the install instead)\n", file=sys.stderr)


def _git_commit():
    """HEAD of the git checkout setup.py runs from; None in an sdist or a copy without .git."""
    try:
        top, head = [subprocess.run(["git", "rev-parse", arg], cwd=ROOT, capture_output=True, text=True, timeout=30)
                     for arg in ("--show-toplevel", "HEAD")]
    except (OSError, subprocess.SubprocessError):
        return None
    # Only this project's own checkout: an sdist unpacked inside another repository must not take its HEAD.
    if top.returncode or head.returncode or Path(top.stdout.strip()).resolve() != ROOT:
        return None
    return head.stdout.strip()


def _write_build_info(pkg_dir):
    # The commit an installed copy was built from (compacter-bench records it): not in git, written
    # into the build / sdist tree only. Without a checkout, keep the one an sdist ships.
    commit = _git_commit()
    if commit is None:
        return
    target = Path(pkg_dir) / "_build_info.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # the sdist tree hard-links files: never write through into the checkout
    target.write_text(f'"""Written by setup.py at build time."""\nGIT_COMMIT = {commit!r}\n')


def _set_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return  # the user's choice; torch reads it
    import torch

    archs = set(DEFAULT_ARCHS)
    if torch.cuda.is_available():  # also build for the local GPUs, for in-place dev builds
        for i in range(torch.cuda.device_count()):
            archs.add("%d.%d" % torch.cuda.get_device_capability(i))
    ordered = sorted(archs, key=lambda a: tuple(map(int, a.split("."))))
    # +PTX on the newest arch: GPUs newer than the list (e.g. sm_100) JIT-compile from it.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(ordered) + "+PTX"


def _cuda_extensions(version):
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _set_arch_list()
    nvcc_threads = os.environ.get("NVCC_THREADS") or "2"
    # Version strings are passed as bare tokens and stringified in ops.cpp (no shell quoting).
    defines = [f"-DCK_VERSION={version}", f"-DCK_SOURCE_HASH={_source_hash()}",
               f"-DCK_TORCH_VERSION={torch.__version__}"]
    ext = CUDAExtension(
        name=f"{PKG}._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu")),
        # Headers as depends: rebuild when they change (MANIFEST.in ships them in the sdist).
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")),
        # No -std flag: torch picks the standard its headers need (C++17, or C++20 for torch>=2.13).
        # No --use_fast_math: GELU needs an exact erf.
        extra_compile_args={"cxx": ["-O3", *defines],
                            "nvcc": ["-O3", "-lineinfo", "--threads", nvcc_threads]},
    )

    class build_ext_or_fall_back(BuildExtension):
        def run(self):
            inplace = self.inplace  # an editable install's; setuptools clears it while building
            try:
                super().run()
            except Exception as err:
                if FORCE:
                    raise
                # Not forced: a failed CUDA build (torch's CUDA version or compiler checks, nvcc, the host
                # compiler) must not fail the install; no stale _C may stay behind, built or in place.
                for self.inplace in (False, True) if inplace else (False,):
                    for e in self.extensions:
                        Path(self.get_ext_fullpath(e.name)).unlink(missing_ok=True)
                self.inplace = inplace
                _warn_without_kernels(f"its build failed ({_one_line(err)})")

    return [ext], {"build_ext": build_ext_or_fall_back}


VERSION = _read_version()
SKIP, FORCE = _env_flag("COMPACTER_KERNELS_SKIP_CUDA_BUILD"), _env_flag("COMPACTER_KERNELS_FORCE_CUDA_BUILD")
if SKIP and FORCE:
    sys.exit("COMPACTER_KERNELS_SKIP_CUDA_BUILD and COMPACTER_KERNELS_FORCE_CUDA_BUILD are both set")
skip_reason = "COMPACTER_KERNELS_SKIP_CUDA_BUILD=1" if SKIP else _cuda_unavailable_reason()
if skip_reason and FORCE:
    sys.exit(f"COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {skip_reason}.")

ext_modules, cmdclass = [], {}
if skip_reason is None:
    try:
        ext_modules, cmdclass = _cuda_extensions(VERSION)
    except Exception as err:
        if FORCE:
            raise
        skip_reason = f"setting up its build failed ({_one_line(err)})"


class build_py_with_info(build_py):
    def run(self):
        super().run()
        _write_build_info(Path(self.build_lib) / PKG)
        if skip_reason:
            # Warn from a build step, not at import: pip runs setup.py several times per install.
            _warn_without_kernels(skip_reason)


class sdist_with_info(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        _write_build_info(Path(base_dir) / PKG)  # a wheel built from the sdist has no git to ask


cmdclass.update(build_py=build_py_with_info, sdist=sdist_with_info)

setup(
    name="compacter_kernels",
    version=VERSION,
    description="Fused GPU kernels for Compacter / Houlsby adapters",
    packages=find_packages(include=[f"{PKG}*"]),
    python_requires=">=3.10",
    # A lower bound only (the oldest tested: scripts/test_oldest.sh): pip keeps any installed torch in range,
    # so an install never replaces the torch the extension is built against.
    install_requires=[f"torch>={MIN_TORCH}"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy"],
        "bench": ["numpy", "matplotlib"],  # compacter-bench's plots (and torch's NumPy interop)
        "integrations": ["transformers>=4.57", "adapters>=1.3.0"],
    },
    entry_points={"console_scripts": ["compacter-bench = compacter_kernels.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
