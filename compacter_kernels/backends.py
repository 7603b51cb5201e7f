"""Which backend runs an op: availability, and the "auto" choice.

A kernel backend's ops are its autograd Functions, listed in ``FUNCTIONS[backend][op]`` once the
backend has loaded (ops "adapter" and "phm_linear"); the reference runs
:mod:`compacter_kernels.reference`. ``"auto"`` picks the fastest backend available for the
inputs' device; CPU tensors go to the reference unless a backend is named. A backend that is
named and cannot run raises an error saying why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch


BACKENDS = ("reference", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Preference order of "auto" for CUDA tensors. The CUDA kernels join it once they have passed
# the per-op tests (tests/test_compacter_adapter.py, ...) on a GPU; until then they run only when named
# (COMPACTER_KERNELS_CUDA_AUTO=1 puts them first, for that validation run).
_AUTO_ORDER = ("cuda", "triton") if os.environ.get("COMPACTER_KERNELS_CUDA_AUTO") == "1" else ("triton",)


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str  # why not, or what it is when available

    def __bool__(self) -> bool:
        return self.available


FUNCTIONS: dict[str, dict[str, type]] = {"triton": {}, "cuda": {}}


# Read once: Triton itself reads it when the package's kernels are defined, at import.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpret() -> bool:
    """Triton's CPU interpreter; must be set before the package is imported."""
    return _TRITON_INTERPRET


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return BackendStatus(False, f"triton is not importable ({e}); install it with `pip install triton`")
    try:
        from .ops.triton import adapter as triton_adapter
        from .ops.triton import phm_linear as triton_phm_linear
    except Exception as e:  # a broken triton install must not break the package
        return BackendStatus(False, f"the Triton kernels failed to load: {e!r}")
    FUNCTIONS["triton"].update(adapter=triton_adapter.TritonAdapter, phm_linear=triton_phm_linear.TritonPHMLinear)
    if triton_interpret():
        return BackendStatus(True, f"triton {triton.__version__} in its CPU interpreter (TRITON_INTERPRET=1: "
                                   "for tests, not speed)")
    if not torch.cuda.is_available():
        return BackendStatus(False, f"triton {triton.__version__} is installed, but no GPU is visible: its kernels "
                                    "run on CUDA tensors only (for tests, TRITON_INTERPRET=1 set before importing "
                                    "compacter_kernels runs them on the CPU)")
    return BackendStatus(True, f"triton {triton.__version__}")


def _cuda_status() -> BackendStatus:
    from . import _extension

    ok, reason = _extension.status()
    if not ok:
        return BackendStatus(False, reason)
    from .ops.cuda import adapter as cuda_adapter  # their ops were registered by _extension once _C loaded
    from .ops.cuda import phm_linear as cuda_phm_linear

    FUNCTIONS["cuda"].update(adapter=cuda_adapter.CudaAdapter, phm_linear=cuda_phm_linear.CudaPHMLinear)
    if not torch.cuda.is_available():  # as the triton backend says it: built, but its kernels need a GPU
        return BackendStatus(False, f"{reason} is built, but no GPU is visible: its kernels run on CUDA tensors "
                                    "only (for tests, COMPACTER_KERNELS_EMULATE_CUDA=1 runs them in a CPU emulator)")
    return BackendStatus(True, reason + "; fused kernels not yet validated on a GPU: used only when named")


_STATUS: dict[str, BackendStatus] = {}


def available_backends() -> dict[str, BackendStatus]:
    """Per backend, whether it is usable in this process and, if not, why."""
    if not _STATUS:
        _STATUS.update(reference=BackendStatus(True, "pure PyTorch, any device"),
                       triton=_triton_status(), cuda=_cuda_status())
    return dict(_STATUS)


def _unsupported(backend: str, x: torch.Tensor) -> Optional[str]:
    """Why ``backend`` cannot take these inputs, or None."""
    if backend == "reference":
        return None
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the {backend} backend (float16, bfloat16, float32)"
    if x.device.type == "cuda" or (backend == "triton" and triton_interpret()):
        return None
    hint = " or set TRITON_INTERPRET=1 before importing compacter_kernels" if backend == "triton" else ""
    return f"the {backend} backend needs CUDA tensors, got a tensor on {x.device}{hint}"


_warned_no_extension = False


def warn_if_extension_missing() -> None:
    """Once per process, on the first call with CUDA tensors: a CUDA install without its CUDA
    kernels (pip hides the build's own warning) says so, with the command that builds them."""
    global _warned_no_extension
    if _warned_no_extension:
        return
    _warned_no_extension = True
    status = available_backends()["cuda"]
    if not status and torch.version.cuda is not None:
        warnings.warn(f"compacter_kernels: the cuda backend is unavailable: {status.reason}. The triton and "
                      "reference backends still run (`python -m compacter_kernels` shows every backend).",
                      stacklevel=4)


def select(backend: str, x: torch.Tensor) -> str:
    """The backend (its name) that runs an op for input ``x`` when ``backend`` is asked for."""
    if x.device.type == "cuda" and not _warned_no_extension and not torch.compiler.is_compiling():
        warn_if_extension_missing()
    if backend == "auto":
        if x.device.type == "cuda":
            status = available_backends()
            for name in _AUTO_ORDER:
                if status[name] and _unsupported(name, x) is None:
                    return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    status = available_backends()[backend]
    if not status:
        raise RuntimeError(f"backend {backend!r} cannot run here: {status.reason}. "
                           "Use backend='auto' or see ck.available_backends().")
    why = _unsupported(backend, x)
    if why is not None:
        raise ValueError(why)
    return backend
