"""What is benchmarked: the presets, the providers, the inputs, and one runnable case.

Providers:
    reference          ck.reference, eager, H rebuilt from its factors on every call (the original code)
    reference+compile  torch.compile of that same function
    triton, cuda       the fused kernels through the public API (validation included, as users call it)
    floor              not run: floor bytes / the device copy bandwidth measured at start
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import functional, reference
from ..backends import available_backends

PROVIDERS = ("reference", "reference+compile", "triton", "cuda", "floor")
FUSED = ("triton", "cuda")


@dataclass(frozen=True)
class Shape:
    model: str
    d: int
    k: int


# 64 and 32768 are where the performance targets are set (report.TARGETS).
FULL_M = (1, 64, 1024, 4096, 16384, 32768, 65536)
# Shapes named after real models; k = d / reduction factor (16 and 32: the targets' shapes).
MODEL_SHAPES = {
    "bert-base": (Shape("bert-base", 768, 48),),  # AdapterHub's default reduction 16
    "t5-base": (Shape("t5-base", 768, 24),),  # the Compacter paper: reduction 32
    "t5-large": (Shape("t5-large", 1024, 32), Shape("t5-large", 1024, 64)),
    "llm-4096": (Shape("llm-4096", 4096, 128), Shape("llm-4096", 4096, 256)),
}
ALL_SHAPES = tuple(s for shapes in MODEL_SHAPES.values() for s in shapes)
PRESETS: dict[str, tuple[tuple[Shape, ...], tuple[int, ...]]] = {
    # A few small sizes: seconds of timing on a CPU (plus torch.compile's first compile).
    "quick": (MODEL_SHAPES["t5-base"], (16, 256, 4096)),
    # Only the sizes the performance targets are judged at: the first run to make on a GPU.
    "targets": (ALL_SHAPES, (64, 32768)),
    **{name: (shapes, FULL_M) for name, shapes in MODEL_SHAPES.items()},
    "full": (ALL_SHAPES, FULL_M),
}


@dataclass(frozen=True)
class Case:
    op: str  # compacter | houlsby | phm_linear
    M: int
    d: int
    k: int
    n: int = 4
    rank: int = 1
    dtype: torch.dtype = torch.float32
    activation: str = "gelu"
    model: str = ""

    @property
    def out_features(self) -> int:
        return self.k if self.op == "phm_linear" else self.d


def skip_reason(provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot be benchmarked on ``device`` at all, or None."""
    if provider not in FUSED:
        return None
    if device.type != "cuda":
        return f"no GPU: the {provider} kernels need CUDA tensors" + (
            " (the Triton CPU interpreter is not benchmarked)" if provider == "triton" else "")
    if provider == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the Triton interpreter is not benchmarked"
    status = available_backends()[provider]
    return None if status else status.reason


def _bind(op: str, fn: Callable, activation: str) -> Callable:
    """fn with the op's signature reduced to (x, *params); the Compacter rule is shared by the
    down and up projections, as the paper's shared_phm_rule."""
    if op == "compacter":
        def call(x, rule, ld, rd, bd, lu, ru, bu):
            return fn(x, rule, ld, rd, bd, rule, lu, ru, bu, activation=activation)
    elif op == "houlsby":
        def call(x, wd, bd, wu, bu):
            return fn(x, wd, bd, wu, bu, activation=activation)
    else:
        def call(x, rule, left, right, bias):
            return fn(x, rule, left, right, bias)
    return call


_REFERENCE = {"compacter": reference.compacter_adapter, "houlsby": reference.adapter,
              "phm_linear": reference.phm_linear}
_PUBLIC = {"compacter": functional.compacter_adapter, "houlsby": functional.adapter,
           "phm_linear": functional.phm_linear}


def provider_fn(op: str, provider: str, activation: str, *, compile_dynamic: bool = True) -> Callable:
    """The (x, *params) -> y callable that ``provider`` runs for ``op``.

    torch.compile with dynamic=True compiles one graph for the whole sweep over M (a second for
    M=1, which is specialised) instead of one per size; pass compile_dynamic=False for static.
    """
    if provider == "reference":
        return _bind(op, _REFERENCE[op], activation)
    if provider == "reference+compile":
        return torch.compile(_bind(op, _REFERENCE[op], activation), dynamic=compile_dynamic)
    if provider in FUSED:
        return _bind(op, functools.partial(_PUBLIC[op], backend=provider), activation)
    raise ValueError(f"provider {provider!r} is not runnable (providers: {PROVIDERS})")


def input_copies(case: Case, device: torch.device) -> int:
    """How many copies of x and dy to rotate so that a call does not find its inputs in cache:
    together at least twice the last-level cache (GPU L2; 32 MiB assumed on a CPU), 2 to 16."""
    cache = 32 * 2**20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    e = torch.finfo(case.dtype).bits // 8
    per_copy = case.M * (case.d + case.out_features) * e
    return max(2, min(16, math.ceil(2 * cache / per_copy)))


def make_inputs(case: Case, device: torch.device, copies: int, seed: int = 0) -> dict[str, Any]:
    """Rotating copies of x (leaf, requires grad) and dy, and the parameters (requires grad).

    Weights scaled so that H has entries of std ~1/sqrt(fan_in): values stay O(1) in bf16.
    """
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast at M = 65536

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(case.dtype)

    def rand(*shape, std=1.0):  # a leaf that requires grad
        return randn(*shape, std=std).requires_grad_()

    d, k, n, r = case.d, case.k, case.n, case.rank

    def phm(i, o):  # (rule, left, right) of an (i, o) PHM weight
        return rand(n, n, n), rand(n, i // n, r), rand(n, r, o // n, std=1 / math.sqrt(i * n * r))

    if case.op == "houlsby":
        params = (rand(d, k, std=d ** -0.5), rand(k, std=0.0), rand(k, d, std=k ** -0.5), rand(d, std=0.0))
    elif case.op == "compacter":
        rule, ld, rd = phm(d, k)
        _, lu, ru = phm(k, d)
        params = (rule, ld, rd, rand(k, std=0.0), lu, ru, rand(d, std=0.0))
    else:
        params = (*phm(d, k), rand(k, std=0.0))
    xs = [rand(case.M, d) for _ in range(copies)]
    dys = [randn(case.M, case.out_features) for _ in range(copies)]
    return {"xs": xs, "dys": dys, "params": params}


def runner(fn: Callable, mode: str, inputs: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(setup, run) for timing.measure / pytest-benchmark's pedantic: setup is not timed.

    fwd: the training forward (inputs require grad, so what backward needs is saved).
    bwd: setup runs the forward; run is the backward alone.
    fwd+bwd: both. torch.autograd.grad, not .backward(): nothing accumulates into .grad.
    """
    xs, dys, params = inputs["xs"], inputs["dys"], inputs["params"]
    order = itertools.cycle(range(len(xs)))
    if mode == "fwd":
        return (lambda: xs[next(order)]), (lambda x: fn(x, *params))
    if mode == "bwd":
        def setup():
            i = next(order)
            return fn(xs[i], *params), dys[i], xs[i]

        return setup, (lambda s: torch.autograd.grad(s[0], (s[2], *params), s[1]))
    if mode == "fwd+bwd":
        return (lambda: next(order)), (lambda i: torch.autograd.grad(fn(xs[i], *params), (xs[i], *params), dys[i]))
    raise ValueError(f"unknown mode {mode!r}")
