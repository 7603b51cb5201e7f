"""Every Triton kernel configuration the package's launchers pick over a grid of training shapes,
compiled for real GPU archs without a GPU, and checked against each chip.

The ops run through the public API (ck.compacter_adapter, ck.adapter, the mixed-task ops,
ck.phm_linear; forward, and backward when training) on CPU tensors of the real shapes. Triton's
GPU driver is replaced by one that compiles for the arch asked for and launches nothing, so
each launch compiles exactly what a GPU would: the launcher's constexprs, warps and stages, and
the specialisation the JIT gives each argument (dtypes, 16-byte alignment, integers equal to 1
or divisible by 16). Each distinct compiled kernel is then checked:

    shared    the shared memory it asks for fits one block on the arch (sm_80 163 KiB, sm_90 227 KiB)
    stack     no bytes of stack per thread (registers spilled to local memory)
    mma       tensor-core instructions (HMMA / HGMMA) in the SASS of a kernel with a matrix
              product in fp16/bf16 (fp32 products run in IEEE fp32 on purpose: none expected)

    python scripts/triton_sweep.py                          # the full grid, sm_80 and sm_90: a table
    python scripts/triton_sweep.py --sample 40 --json       # 40 shapes drawn from the grid (CI)
    python scripts/triton_sweep.py --shape compacter:768:24:4:1:bf16:train:1 -v
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import compacter_kernels as ck
from compacter_kernels import functional
from compacter_kernels._validation import ACTIVATIONS
from compacter_kernels.ops.triton import adapter, config, grads, kron, phm_linear

# Shared memory one block may use, and SMs (the launchers size their grids by them).
ARCHS = {80: dict(shared=166912, sms=108), 90: dict(shared=232448, sms=132)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MATMUL_KERNELS = {"_adapter_fwd_kernel", "_adapter_rows_kernel", "_adapter_cols_kernel", "_reduce_rows_kernel",
                  "_phm_matmul_kernel"}
KERNELS = [k for m in (adapter, grads, kron, phm_linear) for k in vars(m).values() if isinstance(k, JITFunction)
           and k.fn.__name__.endswith("_kernel")]
ROWS = 1024  # rows of x (tokens in a batch); the tile rules do not depend on it

# The goal shapes of issue 30: d, k from d/64 to d/8, n, r, dtypes, training and inference,
# mixed-task batches, phm_linear at the FFN shapes (d -> 4d and back).
D = (512, 768, 1024, 2048, 4096, 5120, 8192)
K_DIVISORS = (64, 32, 16, 8)
N = (2, 4, 8, 16)
R = (1, 4)
TASKS = (1, 64)


class Shape(NamedTuple):
    op: str      # compacter | houlsby | linear (Houlsby on nn.Linear weights) | phm_linear
    d: int       # d_model (phm_linear: in_features)
    k: int       # the bottleneck (phm_linear: out_features)
    n: int       # PHM dimension (1 for houlsby)
    r: int       # rank of W_left @ W_right (0: W unfactorised)
    dtype: str
    mode: str    # train | infer
    tasks: int   # tasks of a mixed-task batch (1: a single-task op)

    def __str__(self):
        return ":".join(str(v) for v in self)

    @classmethod
    def parse(cls, s: str) -> "Shape":
        op, *rest = s.split(":")
        d, k, n, r, dtype, mode, tasks = rest
        return cls(op, int(d), int(k), int(n), int(r), dtype, mode, int(tasks))


def grid() -> list[Shape]:
    shapes = []
    for d, div, dtype, mode in itertools.product(D, K_DIVISORS, DTYPES, ("train", "infer")):
        k = d // div
        for n, r, tasks in itertools.product(N, R, TASKS):
            if d % n == 0 and k % n == 0:
                shapes.append(Shape("compacter", d, k, n, r, dtype, mode, tasks))
        for tasks in TASKS:
            shapes.append(Shape("houlsby", d, k, 1, 0, dtype, mode, tasks))
        shapes.append(Shape("linear", d, k, 1, 0, dtype, mode, 1))
    for d, dtype, mode, n, r in itertools.product(D, DTYPES, ("train", "infer"), N, R):
        shapes += [Shape("phm_linear", d, 4 * d, n, r, dtype, mode, 1), Shape("phm_linear", 4 * d, d, n, r, dtype,
                                                                              mode, 1)]
    return shapes


def run_shape(s: Shape) -> None:
    """One call of the op at shape ``s`` through the public API, backward too when training."""
    dtype, train = DTYPES[s.dtype], s.mode == "train"
    seed = zlib.crc32(str(s).encode())  # the same draw in every process
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(train)

    x = torch.empty(ROWS, s.d, dtype=dtype).requires_grad_(train)
    T = s.tasks
    ids = torch.randint(0, T, (ROWS,), generator=g) if T > 1 else None
    stack = (T,) if T > 1 else ()
    activation = ACTIVATIONS[seed % len(ACTIVATIONS)]
    residual = torch.empty_like(x) if seed % 2 else None  # a residual of its own, or x's
    if s.op == "compacter":
        n, d, k, r = s.n, s.d, s.k, s.r
        rule = w(n, n, n)
        args = [rule, w(*stack, n, d // n, r), w(*stack, n, r, k // n), w(*stack, k),
                rule, w(*stack, n, k // n, r), w(*stack, n, r, d // n), w(*stack, d)]
        y = (ck.multitask_compacter_adapter(x, ids, *args, activation=activation, backend="triton") if T > 1 else
             ck.compacter_adapter(x, *args, activation=activation, residual=residual, backend="triton"))
    elif s.op in ("houlsby", "linear"):  # linear: nn.Linear weights, (out, in) read transposed
        wd, wu = (w(*stack, s.d, s.k), w(*stack, s.k, s.d)) if s.op == "houlsby" else (
            w(*stack, s.k, s.d).transpose(-1, -2), w(*stack, s.d, s.k).transpose(-1, -2))
        args = [wd, w(*stack, s.k), wu, w(*stack, s.d)]
        y = (ck.multitask_adapter(x, ids, *args, activation=activation, backend="triton") if T > 1 else
             ck.adapter(x, *args, activation=activation, residual=residual, backend="triton"))
    else:
        n = s.n
        y = ck.phm_linear(x, w(n, n, n), w(n, s.d // n, s.r), w(n, s.r, s.k // n), w(s.k), backend="triton")
    if train:
        y.backward(torch.empty_like(y))


class CompileOnlyDriver:
    """Triton's GPU driver, as far as a launch asks it: the device, its stream and target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):  # Triton keeps its compiled kernels per device: one per arch
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int, compiled: dict):
    """Launches compile for ``arch`` and launch nothing; ``compiled`` gathers each distinct kernel
    (by its hash) as {"kernel": name, "compiled": CompiledKernel, "shapes": set of shapes}."""
    current = {}

    def recorder(kernel):
        run = type(kernel).run

        def compile_and_record(*args, grid, warmup, **kwargs):
            c = run(kernel, *args, grid=grid, warmup=True, **kwargs)
            entry = compiled.setdefault(c.hash, dict(kernel=kernel.fn.__name__, compiled=c, shapes=set()))
            entry["shapes"].add(current["shape"])
            return c

        return compile_and_record

    saved = dict(select=functional.select, programs=(adapter.num_programs_target, grads.num_programs_target))
    driver.set_active(CompileOnlyDriver(arch))
    for k in KERNELS:
        k.run = recorder(k)
    functional.select = lambda backend, x: "triton"
    adapter.num_programs_target = grads.num_programs_target = lambda device: 2 * ARCHS[arch]["sms"]
    try:
        yield current
    finally:
        for k in KERNELS:
            del k.run
        with contextlib.suppress(RuntimeError):  # without a GPU there is no driver to go back to
            driver.reset_active()
        functional.select = saved["select"]
        adapter.num_programs_target, grads.num_programs_target = saved["programs"]


def resources(c, sass: bool) -> dict:
    """Registers, stack bytes per thread, shared memory and (``sass``: read from the SASS)
    tensor-core instructions of one kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        code = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout if sass else ""
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", usage)}
    return dict(regs=found.get("REG", 0), stack=found.get("STACK", 0), shared=c.metadata.shared,
                mma=len(re.findall(r"\bH[G]?MMA\.", code)), warps=c.metadata.num_warps,
                stages=c.metadata.num_stages)


def check(arch: int, name: str, r: dict, fp32: bool) -> list[str]:
    """What is wrong with one compiled kernel on ``arch``: an empty list when nothing."""
    problems = []
    if r["shared"] > ARCHS[arch]["shared"]:
        problems.append(f"shared {r['shared'] // 1024} KiB > {ARCHS[arch]['shared'] // 1024} KiB")
    if r["stack"]:
        problems.append(f"{r['stack']} bytes of stack")
    if name in MATMUL_KERNELS and not fp32 and not r["mma"]:
        problems.append("no tensor-core instructions")
    return problems


def sweep(shapes: list[Shape], archs: list[int], verbose: bool = False) -> list[dict]:
    rows = []
    for arch in archs:
        compiled, start = {}, time.time()
        with compile_only(arch, compiled) as current:
            for i, s in enumerate(shapes):
                current["shape"] = str(s)
                run_shape(s)
                if verbose or (i + 1) % 50 == 0:
                    print(f"sm_{arch}: {i + 1}/{len(shapes)} shapes, {len(compiled)} kernels, "
                          f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
        for entry in compiled.values():
            shapes_of = sorted(entry["shapes"])
            fp32 = all(Shape.parse(s).dtype == "fp32" for s in shapes_of)
            r = resources(entry["compiled"], sass=entry["kernel"] in MATMUL_KERNELS and not fp32)
            rows.append(dict(arch=arch, kernel=entry["kernel"], **r, shapes=shapes_of,
                             problems=check(arch, entry["kernel"], r, fp32)))
    return rows


def table(rows: list[dict]) -> str:
    """Per arch and kernel: distinct configurations, over the shared-memory limit, spilling, and
    matrix products without tensor cores; then every configuration with a problem."""
    lines = [f"{'arch':6s} {'kernel':24s} {'configs':>8s} {'over smem':>10s} {'spilling':>9s} {'no mma':>7s}"]
    for (arch, kernel), group in itertools.groupby(sorted(rows, key=lambda r: (r["arch"], r["kernel"])),
                                                   key=lambda r: (r["arch"], r["kernel"])):
        group = list(group)
        over = sum(r["shared"] > ARCHS[arch]["shared"] for r in group)
        lines.append(f"sm_{arch:<3d} {kernel:24s} {len(group):8d} {over:10d} {sum(r['stack'] > 0 for r in group):9d} "
                     f"{sum('no tensor-core instructions' in r['problems'] for r in group):7d}")
    bad = [r for r in rows if r["problems"]]
    lines.append(f"{len(rows)} configurations, {len(bad)} with a problem")
    for r in bad:
        lines.append(f"  sm_{r['arch']} {r['kernel']}: {'; '.join(r['problems'])} (warps={r['warps']} "
                     f"stages={r['stages']} regs={r['regs']}), e.g. {r['shapes'][0]} and {len(r['shapes']) - 1} more")
    return "\n".join(lines)


def sample(shapes: list[Shape], count: int, seed: int) -> list[Shape]:
    """``count`` shapes drawn from the grid, always with the edges among them: the paper's shape,
    the widest fused bottleneck (fp32, n = 8, r = 4), a wide 64-task batch, a dense 64-task
    batch (the row grouping's own kernel), nn.Linear weights, and phm_linear's widest rows."""
    always = [Shape("compacter", 768, 24, 4, 1, "bf16", "train", 1),
              Shape("compacter", 8192, 256, 8, 4, "fp32", "train", 1),
              Shape("compacter", 4096, 256, 2, 4, "bf16", "train", 64),
              Shape("houlsby", 1024, 64, 1, 0, "fp16", "infer", 64),
              Shape("linear", 4096, 128, 1, 0, "bf16", "train", 1),
              Shape("phm_linear", 4096, 16384, 4, 1, "bf16", "train", 1)]
    rest = [s for s in shapes if s not in always]
    return always + random.Random(seed).sample(rest, max(0, count - len(always)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="80,90", help="comma list of SM versions")
    p.add_argument("--sample", type=int, default=0, help="this many shapes drawn from the grid (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", action="append", default=[], help="one shape, op:d:k:n:r:dtype:mode:tasks (repeatable)")
    p.add_argument("--json", action="store_true", help="the rows as one JSON list on stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the sweep compiles with the real compiler")
    shapes = [Shape.parse(s) for s in args.shape] or grid()
    if args.sample:
        shapes = sample(shapes, args.sample, args.seed)
    # Past the fused kernels' width the adapter runs as torch matmuls: nothing to compile.
    matmuls = [s for s in shapes if s.op != "phm_linear" and not config.fused_fits(s.k)]
    shapes = [s for s in shapes if s not in matmuls]
    print(f"{len(shapes)} shapes ({len(matmuls)} more run as matmuls), triton {triton.__version__}, "
          f"torch {torch.__version__}", file=sys.stderr)
    rows = sweep(shapes, [int(a) for a in args.arch.split(",")], args.verbose)
    print(json.dumps(rows) if args.json else table(rows))


if __name__ == "__main__":
    main()
