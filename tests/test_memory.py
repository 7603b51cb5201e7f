"""Activation memory kept for backward (bench/timing.py::saved_activation_bytes): the counter on
toy functions, then the fused adapters against the reference, with the bytes counted by hand."""

import pytest
import torch

from compacter_kernels.bench import cases, timing
from utils import ON_GPU, why_backend_cannot_run

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


# ---- the counter ------------------------------------------------------------------------------

def _toy(x, w):
    e = (x @ w).exp()  # mm saves x and w (the caller's); exp saves its result e
    (x * 3).cos()  # dropped: the x * 3 that cos saved is freed with it
    return (e * e).sum() + e[:, 1:].sin().sum()  # e twice and a view of e: the same storage


def test_counts_each_storage_once_and_leaves_out_the_arguments():
    x = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    e_bytes, x_bytes, w_bytes = 8 * 3 * 4, 8 * 4 * 4, 4 * 3 * 4
    assert timing.saved_activation_bytes(_toy, x, w) == (e_bytes, e_bytes + x_bytes + w_bytes)


def test_a_saved_view_counts_its_whole_storage():
    big = torch.randn(10, 10, device=DEVICE, requires_grad=True)
    # exp saves its (10, 1) result; sin saves its input, a view of all of t * 2 (10, 10).
    assert timing.saved_activation_bytes(lambda t: (t * 2)[:, :1].exp(), big) == (40, 40)
    assert timing.saved_activation_bytes(lambda t: (t * 2)[:, :1].sin(), big) == (400, 400)


def test_nothing_is_saved_without_grad():
    x = torch.randn(8, 4, device=DEVICE)
    w = torch.randn(4, 3, device=DEVICE)
    assert timing.saved_activation_bytes(_toy, x, w) == (0, 0)


# ---- the fused adapters against the reference -------------------------------------------------

M, D, K, N, RANK = 48, 64, 16, 4, 1  # M != d, so x and a (d, k) weight differ in size


def _expected(op: str, e: int, backend: str) -> dict[str, timing.SavedBytes]:
    """Bytes each provider saves, counted from what its forward saves.

    Fused (both backends: ops/common.py, save_adapter): x, z (M, k), the weight
    factors and the biases (kept for a second derivative only: parameters, no copies); the new
    tensors are z and the H's (d*k each) where the backend builds them once per call and
    keeps them (cuda always for Compacter; triton past the in-kernel budget, not at this size).
    Reference (reference.py): mm saves x and H_down, gelu saves z, mm saves g and H_up; for
    Compacter, phm_weight also saves B = left @ right (n, I/n, O/n) for the Kronecker product and
    the rule and factors themselves. Adds and the scale save nothing.
    """
    if op == "houlsby":
        params = 2 * D * K  # w_down, w_up
        ref_new = 2 * M * K
    else:
        params = N ** 3 + 2 * (D + K) * RANK  # the shared rule once, W_left and W_right of both projections
        ref_new = 2 * M * K + 2 * D * K + 2 * D * K // N
    fused_new = M * K + (2 * D * K if op == "compacter" and backend == "cuda" else 0)
    return {"reference": timing.SavedBytes(ref_new * e, (ref_new + M * D + params) * e),
            "fused": timing.SavedBytes(fused_new * e, (fused_new + M * D + params + K + D) * e)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["compacter", "houlsby"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_saves_no_more_than_the_reference(backend, op, dtype):
    why = why_backend_cannot_run(backend)
    if why is not None:
        pytest.skip(why)
    case = cases.Case(op, M, D, K, N, RANK, dtype)
    inputs = cases.make_inputs(case, DEVICE, copies=1)
    args = (inputs["xs"][0], *inputs["params"])
    saved = {p: timing.saved_activation_bytes(cases.provider_fn(op, p, "gelu"), *args) for p in ("reference", backend)}
    expected = _expected(op, torch.finfo(dtype).bits // 8, backend)
    assert saved["reference"] == expected["reference"]
    assert saved[backend] == expected["fused"]
    assert saved[backend].new <= saved["reference"].new and saved[backend].total <= saved["reference"].total
