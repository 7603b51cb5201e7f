"""The one place the compiled module `compacter_kernels._C` is imported.

`load()` returns the module or None and never raises; `status()` says why not. A missing,
broken or stale build only disables the CUDA backend: the rest of the package still imports.
After a good load, the fake (meta) and autograd impls of the C++ ops are registered here.
"""
import importlib
from pathlib import Path
from typing import Optional, Tuple

import torch

from ._source_hash import source_hash

_REBUILD = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation {}."
_state: Optional[Tuple[object, bool, str]] = None  # (module or None, ok, reason), cached
_registered = False


def _source_tree() -> Optional[Path]:
    """csrc/ of an in-place or editable checkout (next to the package), else None."""
    root = Path(__file__).resolve().parent.parent
    return root / "csrc" if (root / "csrc").is_dir() and (root / "setup.py").is_file() else None


def _rebuild_hint() -> str:
    return _REBUILD.format("-e " if _source_tree() is not None else "")


def _stale_reason(module) -> Optional[str]:
    """Why the loaded module does not match this package and torch, or None if it does."""
    from ._version import __version__

    info = module.build_info()
    if info["version"] != __version__:
        return f"built as version {info['version']}, package is {__version__}"
    if info.get("torch_version") != str(torch.__version__):
        return f"built against torch {info.get('torch_version')}, running torch {torch.__version__}"
    csrc = _source_tree()
    if csrc is not None and source_hash(csrc) != info["source_hash"]:
        return f"the sources in {csrc} changed since the extension was built"
    return None


def _try_load() -> Tuple[object, bool, str]:
    try:
        # import_module, not `from . import _C`: that raises a bare ImportError when _C is absent.
        _C = importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            return None, False, f"compacter_kernels._C failed to import ({e}): rebuild with `{_rebuild_hint()}`"
        cuda = f"CUDA {torch.version.cuda.split('.')[0]}.x" if torch.version.cuda else "CUDA"
        return None, False, (
            "not built (package installed without the CUDA extension; the install's WARNING line said why: "
            f"reinstall with `{_rebuild_hint()}` where a toolkit of this torch's {cuda} is at CUDA_HOME)")
    except Exception as e:  # undefined symbol, missing libcudart, ...
        return None, False, (
            f"compacter_kernels._C failed to import ({type(e).__name__}: {e}); it was probably built "
            f"against another torch or CUDA: rebuild with `{_rebuild_hint()}`")
    try:
        stale = _stale_reason(_C)
    except Exception as e:
        stale = f"build_info() failed ({e})"
    if stale is not None:
        return None, False, f"stale build: {stale}; rebuild with `{_rebuild_hint()}`"
    try:
        _register()
    except Exception as e:  # e.g. another fake/autograd impl already registered for the op
        return None, False, f"registering the Python side of the ops failed ({type(e).__name__}: {e})"
    info = _C.build_info()
    cuda = info["cuda_version"]
    return _C, True, f"compacter_kernels._C {info['version']} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"


def load():
    """The compiled module, or None when it is missing, broken or stale (see `status()`)."""
    global _state
    if _state is None:
        _state = _try_load()
    return _state[0]


def status() -> Tuple[bool, str]:
    """(ok, reason): whether the CUDA extension is usable, and if not, what to do about it."""
    load()
    return _state[1], _state[2]


def _register():
    """Python-side impls of the C++ ops (once per process)."""
    global _registered
    if _registered:
        return

    # The fake impls of the C++ ops and the Functions over them (registered at import, which
    # needs the C++ ops).
    from .ops.cuda import adapter, phm_linear  # noqa: F401
    _registered = True
