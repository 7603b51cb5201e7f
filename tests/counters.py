"""What a call runs on the device, counted deterministically: Triton launches and the aten ops
that compute (not the ones that only allocate or make views), forward and backward apart; and,
in Triton's interpreter, the bytes every launch loads and stores per base tensor (mask-true
elements only), named by the kernel argument it was passed as."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.runtime.interpreter as triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from compacter_kernels.bench.counts import computes

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
        if computes(func):
            self.counts.aten[name.split("::")[1]] += 1
        return func(*args, **kwargs)


def _triton_impls() -> dict:
    from compacter_kernels.ops.triton import adapter, phm_linear

    return {"compacter_kernels::triton_adapter_fwd": adapter.adapter_forward,
            "compacter_kernels::triton_adapter_bwd": adapter.adapter_backward,
            "compacter_kernels::triton_phm_linear_fwd": phm_linear.phm_linear_forward,
            "compacter_kernels::triton_phm_linear_bwd": phm_linear.phm_linear_backward}


def _emulated_launches() -> int:
    return torch.ops.compacter_kernels_emulation.launches()


@contextlib.contextmanager
def counting(backend: str = "triton"):
    """Yields a Counts filled by everything run inside: kernel launches and aten ops. triton:
    Triton launches (the interpreter's or the compiler's; what a launch does on the host is
    hidden from the aten count); cuda: the CUDA emulator's launches, as "emulated" (the C++
    ops' own allocations are hidden from the aten count)."""
    recorder = _Recorder(_triton_impls() if backend == "triton" else {})  # the cuda backend has C++ ops only
    if backend == "cuda":
        before = _emulated_launches()
        try:
            with recorder:
                yield recorder.counts
        finally:
            recorder.counts.launches["emulated"] += _emulated_launches() - before
        return
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


def forward_backward_counts(fn, args, grad_of, backend: str = "triton"):
    """(forward Counts, backward Counts) of fn(*args) and the gradients of ``grad_of``."""
    with counting(backend) as fwd:
        y = fn(*args)
    dy = torch.randn_like(y)
    with counting(backend) as bwd:
        torch.autograd.grad(y, grad_of, dy)
    return fwd, bwd


@dataclass
class Traffic:
    """Bytes loaded and stored per base tensor (its storage), with the names it was passed by."""
    loaded: Counter = field(default_factory=Counter)  # storage address -> bytes
    stored: Counter = field(default_factory=Counter)
    names: dict = field(default_factory=dict)  # storage address -> ["kernel.arg", ...]
    sizes: dict = field(default_factory=dict)  # storage address -> bytes of the tensor first seen

    def of(self, t: torch.Tensor) -> tuple[float, float]:
        """(reads, writes) of tensor t, in multiples of its own size."""
        key = t.untyped_storage().data_ptr()
        size = t.numel() * t.element_size()
        return self.loaded[key] / size, self.stored[key] / size

    def by_name(self, name: str) -> tuple[float, float]:
        """(reads, writes) of the tensor passed as ``name`` ("kernel.arg"), in multiples of its size."""
        (key,) = [k for k, names in self.names.items() if name in names]
        return self.loaded[key] / self.sizes[key], self.stored[key] / self.sizes[key]


@contextlib.contextmanager
def traffic():
    """Yields a Traffic filled by the Triton launches run inside (TRITON_INTERPRET=1 only)."""
    record = Traffic()
    ranges: list[tuple[int, int, int]] = []  # (start, end, storage key) of the current launch's tensors
    builder = triton_interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    executor_call = triton_interpreter.GridExecutor.__call__

    def account(counter, ptrs, mask):
        addrs = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addrs = addrs[np.broadcast_to(mask.data, addrs.shape)]
        size = np.dtype(triton_interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        for start, end, key in ranges:
            inside = np.count_nonzero((addrs >= start) & (addrs < end))
            if inside:
                counter[key] += int(inside) * size

    def counted_load(self, ptrs, mask, *args):
        account(record.loaded, ptrs, mask)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        account(record.stored, ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    def call(self, *args, **kwargs):
        ranges.clear()
        for name, arg in zip(self.arg_names, args):
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                key = storage.data_ptr()
                ranges.append((key, key + storage.nbytes(), key))
                record.names.setdefault(key, []).append(f"{self.fn.__name__}.{name}")
                record.sizes.setdefault(key, arg.numel() * arg.element_size())
        ranges[:] = list({r[2]: r for r in ranges}.values())  # a tensor passed twice counts once
        return executor_call(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    triton_interpreter.GridExecutor.__call__ = call
    try:
        yield record
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        triton_interpreter.GridExecutor.__call__ = executor_call
