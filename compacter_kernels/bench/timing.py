"""Timing, memory and bandwidth measurement, and the progress bar.

Every measurement takes a ``setup`` (not timed: picks the next input copy, or runs the forward
that a backward needs) and a ``fn(state)`` (timed), the same split pytest-benchmark's
``pedantic(setup=...)`` uses, so the suite in benchmarks/ times exactly what the command times.
"""

from __future__ import annotations

import math
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch


def quantiles(samples: Sequence[float], qs: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """Linearly interpolated quantiles (numpy's default method), without numpy."""
    if not samples:
        raise ValueError("quantiles of an empty sample")
    s = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setup: Callable[[], Any], fn: Callable[[Any], Any], device: torch.device, *,
            warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000) -> Timing:
    """Median and p20/p80 of ``fn(setup())`` per call, after a warm-up.

    GPU: CUDA events around each call (the queue is not drained between calls, as
    triton.testing.do_bench, so launch overhead shows only where it is not hidden by GPU work).
    CPU: perf_counter. The first call (compilation, autotuning, allocator growth) is never
    timed; the number of reps is what fits in ``rep_ms`` by an estimate from the warm-up.
    """
    fn(setup())
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn(setup())
        sync(device)
        n += 1
    est_ms = (time.perf_counter() - t0) * 1e3 / n
    reps = int(min(max_reps, max(min_reps, rep_ms / max(est_ms, 1e-6))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            state = setup()
            start.record()
            fn(state)
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        samples = []
        for _ in range(reps):
            state = setup()
            t = time.perf_counter()
            fn(state)
            samples.append((time.perf_counter() - t) * 1e3)
    return Timing(*quantiles(samples), reps=reps)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device copy bandwidth in GB/s, counting read + write: the speed the floor is measured at.

    256 MiB is well above any GPU's L2 (50 MB on H100) and CPU's L3.
    """
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: None, lambda _: dst.copy_(src), device, warmup_ms=10, rep_ms=200, max_reps=50)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def peak_memory_mib(setup: Callable[[], Any], fn: Callable[[Any], Any], device: torch.device) -> Optional[float]:
    """GPU memory ``fn`` allocates at its peak above what was live before it (None on CPU:
    the CPU allocator keeps no peak statistics)."""
    if device.type != "cuda":
        return None
    state = setup()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, state
    return peak / 2**20


class SavedBytes(NamedTuple):
    new: int  # storages the forward allocated: the activation memory it adds until backward
    total: int  # new + the storages of the arguments it saved (x, weights: alive anyway)


def saved_activation_bytes(fn: Callable[..., Any], *args: Any) -> SavedBytes:
    """Bytes autograd keeps from the forward ``fn(*args)`` for its backward, on any device.

    Every tensor saved for backward passes through a saved_tensors_hooks pack hook, which sees
    it (torch.compile's saved tensors too: AOTAutograd saves them with save_for_backward).
    Each distinct storage counts once and whole (a saved view keeps all of its storage alive);
    tensors saved by a branch whose result was dropped are freed, so only those still alive when
    the forward returns count. ``new`` leaves out the storages of the tensor arguments (x and the
    parameters, which the caller holds anyway); ``total`` includes them.
    """
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))  # the graph holds t (what pack returns) as long as it keeps it
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:
            s = t.untyped_storage()
            storages[(t.device, s.data_ptr())] = s.nbytes()
    del out
    owned = {(a.device, a.untyped_storage().data_ptr()) for a in args if isinstance(a, torch.Tensor)}
    return SavedBytes(new=sum(b for key, b in storages.items() if key not in owned),
                      total=sum(storages.values()))


class Progress:
    """A one-line progress bar on stderr, rewritten in place: ``[####------]  12/40  label``."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.width, self.done = max(total, 1), width, 0
        self._last = 0

    def show(self, label: str) -> None:
        """Announce the item that starts now (it counts as done at the next show/close)."""
        self._write(label)
        self.done += 1

    def close(self) -> None:
        self.done = min(self.done, self.total)
        self._write("done")
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _write(self, label: str) -> None:
        filled = self.width * self.done // self.total
        line = f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done:>4}/{self.total}  {label}"
        # sys.stderr looked up per call, so pytest's capsys (and redirections) see it.
        sys.stderr.write("\r" + line.ljust(self._last))
        sys.stderr.flush()
        self._last = len(line)
