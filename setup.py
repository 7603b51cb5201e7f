"""Build compacter_kernels, with the CUDA extension `compacter_kernels._C` when possible.

CUDA build (needs the torch you will run with, so no build isolation):

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .      # add -e for a dev checkout

Environment switches:
    COMPACTER_KERNELS_SKIP_CUDA_BUILD=1   pure-Python install (Triton / PyTorch backends only)
    COMPACTER_KERNELS_FORCE_CUDA_BUILD=1  build the extension or fail (no silent fallback)
    TORCH_CUDA_ARCH_LIST                  default: "8.0;9.0+PTX" (+ the local GPUs' archs if visible)
    MAX_JOBS                              parallel compile jobs (torch's default: every core)
    NVCC_THREADS                          nvcc threads per compile job (default 2)
"""
import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PKG = "compacter_kernels"
DEFAULT_ARCHS = ("8.0", "9.0")
INSTALL_HINT = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation ."


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read_version():
    # Single source of truth: __version__ in the package, read without importing it (needs torch).
    text = (ROOT / PKG / "__init__.py").read_text()
    return re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M).group(1)


def _source_hash():
    # Load the stdlib-only hasher by path: importing the package would import torch.
    spec = importlib.util.spec_from_file_location("_ck_source_hash", ROOT / PKG / "_source_hash.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_hash(ROOT / "csrc")


def _cuda_unavailable_reason():
    """None when the CUDA extension can be built here, else a sentence saying why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return ("torch is not importable in the build environment (pip's build isolation hides the "
                "installed torch: pass --no-build-isolation)")
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    home = Path(CUDA_HOME)
    if not [*home.glob("include/cuda_runtime.h"), *home.glob("targets/*/include/cuda_runtime.h")]:
        # e.g. torch guessed CUDA_HOME=/usr/local from an nvcc wrapper script in /usr/local/bin.
        return (f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit root (no include/cuda_runtime.h): "
                "set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda")
    return None


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
    return [ext], {"build_ext": BuildExtension}


VERSION = _read_version()
SKIP, FORCE = _env_flag("COMPACTER_KERNELS_SKIP_CUDA_BUILD"), _env_flag("COMPACTER_KERNELS_FORCE_CUDA_BUILD")
if SKIP and FORCE:
    sys.exit("COMPACTER_KERNELS_SKIP_CUDA_BUILD and COMPACTER_KERNELS_FORCE_CUDA_BUILD are both set")
skip_reason = "COMPACTER_KERNELS_SKIP_CUDA_BUILD=1" if SKIP else _cuda_unavailable_reason()
if skip_reason and FORCE:
    sys.exit(f"COMPACTER_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {skip_reason}.")

ext_modules, cmdclass = [], {}
if skip_reason is None:
    ext_modules, cmdclass = _cuda_extensions(VERSION)
else:
    class build_py_with_warning(build_py):
        # Warn from a build step, not at import: pip runs setup.py several times per install.
        def run(self):
            super().run()
            print(f"\nWARNING: compacter_kernels is installed WITHOUT its CUDA kernels: {skip_reason}. "
                  f"The Triton and PyTorch backends still work. To build the kernels: {INSTALL_HINT}\n",
                  file=sys.stderr)

    cmdclass["build_py"] = build_py_with_warning

setup(
    name="compacter_kernels",
    version=VERSION,
    description="Fused GPU kernels for Compacter / Houlsby adapters",
    packages=find_packages(include=[f"{PKG}*"]),
    python_requires=">=3.10",
    install_requires=["torch"],  # unpinned: never replaces the torch the extension was built against
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
