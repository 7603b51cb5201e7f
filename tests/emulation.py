"""The cuda backend's kernels on the CPU, for test runs without a GPU.

With ``COMPACTER_KERNELS_EMULATE_CUDA=1``, conftest calls `enable()`, which builds and loads
tests/cuda_emulation/ (the kernels of csrc/ compiled for the CPU, with CPU impls of the
extension's ops) and lets the cuda backend take CPU tensors. The same tests that hold the cuda
backend to the reference on a GPU then run its kernels here: indexing, tiling, masking, shared
memory layout and the host code, not speed (see tests/cuda_emulation/emulated_cuda.h for what
the emulation does and does not show). It registers CPU kernels for ops that otherwise have
none, so it runs in a pytest process of its own (scripts/test.sh does both runs).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "COMPACTER_KERNELS_EMULATE_CUDA"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def requested() -> bool:
    return os.environ.get(ENV) == "1"


def _cuda_include() -> Path:
    from torch.utils.cpp_extension import CUDA_HOME

    home = os.environ.get("CUDA_HOME") or CUDA_HOME or "/usr/local/cuda"
    inc = Path(home) / "include"
    if not (inc / "cuda_fp16.h").exists():
        raise RuntimeError(f"{ENV}=1 needs the CUDA toolkit's headers (cuda_fp16.h): none in {inc}; set CUDA_HOME")
    return inc


def _build(name: str, source: str, *, sanitize: bool = False, **kw):
    """torch's extension builder (cached) on tests/cuda_emulation/<source>."""
    from torch.utils.cpp_extension import load

    # C++20 for std::barrier; -O1 keeps the build short; the CUDA headers' device attributes
    # (__device__, __shared__) mean nothing to the host compiler.
    cflags = ["-std=c++20", "-O1", "-pthread", "-Wno-attributes"] + (["-g", "-fsanitize=thread"] if sanitize else [])
    return load(name=name, sources=[str(HERE / "cuda_emulation" / source)],
                extra_include_paths=[str(ROOT / "csrc"), str(HERE / "cuda_emulation"), str(_cuda_include())],
                extra_cflags=cflags, extra_ldflags=["-pthread"] + (["-fsanitize=thread"] if sanitize else []),
                is_python_module=False, verbose=os.environ.get("CI") == "true", **kw)


def race_check_executable() -> str:
    """tests/cuda_emulation/race_check.cpp built with ThreadSanitizer: a program of its own."""
    return _build("compacter_kernels_race_check", "race_check.cpp", sanitize=True, is_standalone=True)


def enable() -> None:
    """Build and load the emulated ops, then let the cuda backend run on CPU tensors."""
    import torch

    from compacter_kernels import _extension, backends

    if _extension.load() is None:
        raise RuntimeError(f"{ENV}=1 needs the built extension: {_extension.status()[1]}")
    _build("compacter_kernels_cuda_emulation", "emulated_ops.cpp")

    # The package refuses CPU tensors for the cuda backend (and calls it unavailable without a
    # GPU); the emulated ops take them.
    backends.available_backends()
    backends._STATUS["cuda"] = backends.BackendStatus(True, f"{_extension.status()[1]}, its kernels in the CPU "
                                                            "emulator (tests)")
    unsupported = backends._unsupported
    backends._unsupported = lambda name, x: None if name == "cuda" and x.dtype in backends.KERNEL_DTYPES \
        else unsupported(name, x)
    from compacter_kernels.ops.cuda import adapter as cuda_adapter

    cuda_adapter.check_device = lambda x: None
    assert torch._C._dispatch_has_kernel_for_dispatch_key("compacter_kernels::cuda_adapter_fwd", "CPU")
