"""Bytes moved per base tensor, counted in Triton's interpreter (tests/counters.py::traffic):
what the triton backend's kernels read and write of each tensor, in multiples of its size,
against the least a fused adapter must move (benchmarks/NOTES.md has the fractions of the floor
these counts predict). A target the kernels do not meet yet is a strict xfail: it starts
failing the day a change meets it, so that the count is then made a plain assert."""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels.ops.triton import adapter
from compacter_kernels.ops.triton import config, launch
from counters import traffic
from utils import compacter_inputs, why_backend_cannot_run

pytestmark = pytest.mark.skipif(not launch.interpreting() or why_backend_cannot_run("triton") is not None,
                                reason="the traffic counter reads Triton's interpreter (TRITON_INTERPRET=1)")

CASES = [(768, 24, 1), (1024, 64, 1)]  # H built in the kernels; H prebuilt
IDS = ["d768-k24-H-in-kernel", "d1024-k64-H-prebuilt"]


def _run(d, k, rank, residual=False, M=37):
    inp = compacter_inputs(lead=(M,), d=d, k=k, n=4, rank=rank, dtype=torch.float32)
    r = torch.randn_like(inp.x) if residual else None
    with traffic() as fwd:
        y = ck.compacter_adapter(*inp.args(), residual=r, backend="triton")
    dy = torch.randn_like(y)
    with traffic() as bwd:
        grads = torch.autograd.grad(y, inp.tensors(), dy)
    return inp, y, dy, grads, fwd, bwd


@pytest.mark.parametrize("d,k,rank", CASES, ids=IDS)
def test_forward_writes_y_once_and_reads_x_at_most_twice(d, k, rank):
    inp, y, _, _, fwd, _ = _run(d, k, rank)
    assert fwd.of(y) == (0, 1)
    assert fwd.of(inp.x) == (2, 0)  # the residual's read is the second pass of the same program
    assert fwd.by_name("_adapter_fwd_kernel.z_ptr") == (0, 1)


@pytest.mark.parametrize("d,k,rank", CASES, ids=IDS)
def test_backward_reads_x_and_z_once_and_writes_dx_once(d, k, rank):
    inp, _, dy, grads, _, bwd = _run(d, k, rank)
    assert bwd.of(inp.x) == (1, 0)
    assert bwd.of(grads[0]) == (0, 1)
    assert bwd.by_name("_adapter_rows_kernel.z_ptr") == (1, 0)
    assert bwd.of(dy) == (2, 0)  # once in the rows kernel, once in the columns kernel
    tiles = -(-d // config.columns_blocks(k, 4)[0])
    for buf in ("g_ptr", "dz_ptr"):  # written once, read once per column tile of the columns kernel
        assert bwd.by_name(f"_adapter_rows_kernel.{buf}") == (tiles, 1)


@pytest.mark.xfail(strict=True, reason="issue 13: g and dz are read once per column tile of d")
def test_backward_reads_g_and_dz_once():
    _, _, _, _, _, bwd = _run(768, 24, 1)
    assert bwd.by_name("_adapter_rows_kernel.g_ptr")[0] <= 1 and bwd.by_name("_adapter_rows_kernel.dz_ptr")[0] <= 1


def test_with_a_residual_dy_is_read_twice_and_copied_once():
    inp, _, dy, grads, _, bwd = _run(768, 24, 1, residual=True)
    assert bwd.of(dy) == (2, 0) and bwd.of(grads[0]) == (0, 1)
    assert bwd.by_name("_adapter_rows_kernel.dres_ptr") == (0, 1)


@pytest.mark.parametrize("d,k,rank", CASES + [(96, 24, None)], ids=IDS + ["d96-k24-unfactored"])
def test_the_benchmarks_byte_model_is_what_the_counter_counts(d, k, rank):
    """adapter.counted_bytes (compacter-bench's "bytes / floor" column) against the bytes counted
    of the per-row tensors and the partial buffers, forward and backward."""
    inp, y, dy, grads, fwd, bwd = _run(d, k, rank)
    e, M = inp.x.element_size(), inp.x.shape[0]

    def moved(record, *names, tensors=()):
        keys = {k for k, ns in record.names.items() if any(n in ns for n in names)}
        keys |= {t.untyped_storage().data_ptr() for t in tensors}
        return sum(record.loaded[k] + record.stored[k] for k in keys)

    assert moved(fwd, "_adapter_fwd_kernel.z_ptr", tensors=(inp.x, y)) == adapter.counted_bytes(
        M, d, k, e, 4, backward=False, programs=launch.num_programs_target(None))
    counted = moved(bwd, *(f"_adapter_rows_kernel.{b}" for b in ("z_ptr", "g_ptr", "dz_ptr")),
                    "_adapter_cols_kernel.part_ptr", "_adapter_cols_kernel.csum_ptr", tensors=(inp.x, dy, grads[0]))
    assert counted == adapter.counted_bytes(M, d, k, e, 4, backward=True,
                                            programs=launch.num_programs_target(None))


def test_the_counter_sees_an_extra_read(monkeypatch):
    columns = adapter._columns

    def twice(*args, **kwargs):
        columns(*args, **kwargs)
        return columns(*args, **kwargs)

    monkeypatch.setattr(adapter, "_columns", twice)
    inp, _, dy, _, _, bwd = _run(96, 24, 1)
    assert bwd.of(dy) == (3, 0) and bwd.of(inp.x) == (2, 0)


@pytest.mark.parametrize("d,k", [(768, 24), (1024, 32)])
def test_partials_stay_within_two_percent_of_the_floor_at_32768_rows(d, k):
    """The split count of reduce_rows at the target size on an H100/H200 (132 SMs: 264 programs):
    partials written once and read n = 4 times, both products, within 2% of the backward floor.
    (At d = 4096, k = 128 even one split costs 2.6%: factor_grads' n-fold read; NOTES.)"""
    M, e, n = 32768, 2, 4
    floor = (3 * M * d + M * k) * e
    per_split = 2 * d * k * 4 * (1 + n)
    tiles = -(-d // config.columns_blocks(k, e)[0])
    splits, rows = config.split_rows(M, 64, tiles, per_split, floor, 264)
    assert splits * rows >= M and splits * per_split <= 0.02 * floor, (splits, per_split, floor)


@pytest.mark.parametrize("d,k,rank", CASES, ids=IDS)
def test_inference_writes_y_and_no_z(d, k, rank):
    """Under no_grad (or inference_mode, or with frozen weights) the forward skips z: y is the
    same, written once, and nothing else per row is stored."""
    inp = compacter_inputs(lead=(37,), d=d, k=k, n=4, rank=rank, dtype=torch.float32)
    with_z = ck.compacter_adapter(*inp.args(), backend="triton")
    for context in (torch.no_grad, torch.inference_mode):
        with context(), traffic() as fwd:
            y = ck.compacter_adapter(*inp.args(), backend="triton")
        assert torch.equal(y, with_z.detach())
        assert fwd.of(y) == (0, 1) and fwd.of(inp.x) == (2, 0)
        written = {key for key, stored in fwd.stored.items() if stored}
        built_h = {key for key, names in fwd.names.items() if any(n.startswith("_build_h_kernel.h") for n in names)}
        assert written - built_h == {y.untyped_storage().data_ptr()}  # y, and a prebuilt H if any: no z
