"""What a call runs on the device, counted deterministically: Triton launches and the aten ops
that compute (not the ones that only allocate or make views), forward and backward apart."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import triton
import triton.runtime.interpreter as triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@dataclass
class Counts:
    launches: Counter = field(default_factory=Counter)  # Triton kernel name -> launches
    aten: Counter = field(default_factory=Counter)  # aten op name -> calls that compute

    @property
    def total(self) -> int:
        return sum(self.launches.values()) + sum(self.aten.values())


class _Recorder(TorchDispatchMode):
    """Records aten compute ops; a custom op of ours runs its Python impl under the recorder,
    so that what the op does inside (allocations, torch ops, launches) is seen too."""

    def __init__(self, impls: dict):
        super().__init__()
        self.impls, self.counts = impls, Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.impls:
            with self:
                return self.impls[name](*args, **kwargs)
        if func.namespace == "aten" and not _is_view(func) and func._schema.name.split("::")[1] not in ALLOCATIONS:
            self.counts.aten[func._schema.name.split("::")[1]] += 1
        return func(*args, **kwargs)


def _triton_impls() -> dict:
    from compacter_kernels.ops.triton import adapter, phm_linear

    return {"compacter_kernels::triton_adapter_fwd": adapter._adapter_fwd,
            "compacter_kernels::triton_adapter_bwd": adapter._adapter_bwd,
            "compacter_kernels::triton_phm_linear_fwd": phm_linear._phm_linear_fwd,
            "compacter_kernels::triton_phm_linear_bwd": phm_linear._phm_linear_bwd}


@contextlib.contextmanager
def counting():
    """Yields a Counts filled by everything run inside: Triton launches (the interpreter's or the
    compiler's; what a launch does on the host is hidden from the aten count) and aten ops."""
    recorder = _Recorder(_triton_impls())
    originals = {cls: cls.__getitem__ for cls in (triton_interpreter.InterpretedFunction,
                                                 triton.runtime.jit.KernelInterface)}

    def counted(cls):
        def getitem(self, grid):
            launch = originals[cls](self, grid)

            def run(*args, **kwargs):
                recorder.counts.launches[getattr(self, "__name__", None) or self.fn.__name__] += 1
                with _disable_current_modes():
                    return launch(*args, **kwargs)
            return run
        return getitem

    for cls in originals:
        cls.__getitem__ = counted(cls)
    try:
        with recorder:
            yield recorder.counts
    finally:
        for cls, fn in originals.items():
            cls.__getitem__ = fn


def forward_backward_counts(fn, args, grad_of):
    """(forward Counts, backward Counts) of fn(*args) and the gradients of ``grad_of``."""
    with counting() as fwd:
        y = fn(*args)
    dy = torch.randn_like(y)
    with counting() as bwd:
        torch.autograd.grad(y, grad_of, dy)
    return fwd, bwd
