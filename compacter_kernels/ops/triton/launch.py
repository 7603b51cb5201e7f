"""What every Triton launch of the package shares: the interpreter switch and its lock, output
allocation (poisoned for tests), the device's program count, and host-side integer helpers."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional

import torch


# Set to True (tests do) to fill every output with NaN before a kernel writes it, so a kernel
# that leaves part of an output unwritten cannot pass.
POISON = os.environ.get("COMPACTER_KERNELS_POISON", "0") == "1"


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


# Triton reads TRITON_INTERPRET when the kernels are decorated, at import: read once here too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


# Held around every launch in Triton's CPU interpreter, which patches module-level state while a
# kernel runs (two threads at once fail there); compiled launches need no lock.
LAUNCH_LOCK = threading.Lock() if interpreting() else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def num_programs_target(device_index: Optional[int]) -> int:
    """About two waves of programs on the GPU (a few on the CPU interpreter)."""
    if device_index is None:
        return 4
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> Optional[int]:
    i = t.get_device()  # -1 off the GPU; one call, cheaper than reading t.device twice (host time)
    return None if i < 0 else i


# Host-side integer helpers: triton.cdiv / triton.next_power_of_2 are ConstexprFunction objects,
# about 1.6 us a call, and a backward makes dozens of these calls.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded(n: int) -> int:
    """tl.dot needs every tile side >= 16, and tiles are powers of two."""
    return max(16, pow2(n))
