"""The Triton kernels as the launchers pick them, compiled for real GPUs (sm_80, sm_90) without
one (scripts/triton_sweep.py): over a sample of the goal shapes, every configuration fits the
chip's shared memory, keeps its registers (no stack; `_stack_allowed` names what is open), and
runs its matrix products on the tensor cores. Catches what the CPU interpreter cannot (a compile
error, a launch that asks for more shared memory than the chip has, a tile that spills) before a
GPU session does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compacter_kernels.ops.triton import config
from utils import checkout_env

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "triton_sweep.py"
KERNELS = {"_adapter_fwd_kernel", "_adapter_rows_kernel", "_adapter_cols_kernel", "_factor_grads_kernel",
           "_build_h_kernel", "_group_rows_kernel", "_reduce_rows_kernel", "_phm_matmul_kernel"}


def _sweep(*args: str) -> list[dict]:
    env = checkout_env(drop=("TRITON_INTERPRET",))
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sampled():
    # 40 shapes of the goal grid (a fixed draw) with its edges (`triton_sweep.sample`); those past
    # the fused kernels' width run as matmuls and compile nothing (tests/op_checks.py::check_wide_bottleneck).
    return _sweep("--sample", "40")


def _stack_allowed(kernel: str) -> int:
    """Open (benchmarks/NOTES.md): ptxas keeps 8-16 bytes on the stack in a few rows and columns
    kernels that are not short of registers (a loop-carried index or predicate parked there; a
    register budget moved it to other shapes, it did not remove it): under Triton 3.2 (torch 2.6)
    and 3.6 (the GPU machines') in fp32 configurations of this sample, under 3.8 in a few sm_90
    configurations of the grid outside it. factor_grads keeps none (its column chunks and register
    budget)."""
    return 0 if kernel == "_factor_grads_kernel" or config.TRITON_VERSION >= (3, 7) else 16


def test_every_sampled_launch_fits_the_chip_without_spills(sampled):
    bad = []
    for r in sampled:
        problems = [p for p in r["problems"] if "stack" not in p or r["stack"] > _stack_allowed(r["kernel"])]
        if problems:
            bad.append(f"sm_{r['arch']} {r['kernel']}: {'; '.join(problems)}, e.g. {r['shapes'][0]}")
    assert not bad, "\n".join(bad)


def test_the_sample_reaches_every_kernel_on_both_archs(sampled):
    for arch in (80, 90):
        assert {r["kernel"] for r in sampled if r["arch"] == arch} == KERNELS


def test_the_check_catches_what_a_gpu_would_refuse():
    """The checker itself: a kernel over the shared-memory limit, one with stack, and a
    matrix product off the tensor cores are each reported; fp32's IEEE products are not."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import triton_sweep
    finally:
        sys.path.pop(0)
    ok = dict(shared=1024, stack=0, mma=8)
    assert triton_sweep.check(80, "_adapter_fwd_kernel", ok, fp32=False) == []
    assert triton_sweep.check(80, "_adapter_fwd_kernel", {**ok, "shared": 200 * 1024}, fp32=False)
    assert not triton_sweep.check(90, "_adapter_fwd_kernel", {**ok, "shared": 200 * 1024}, fp32=False)
    assert triton_sweep.check(90, "_factor_grads_kernel", {**ok, "stack": 8}, fp32=False)
    assert triton_sweep.check(90, "_phm_matmul_kernel", {**ok, "mma": 0}, fp32=False)
    assert not triton_sweep.check(90, "_phm_matmul_kernel", {**ok, "mma": 0}, fp32=True)
