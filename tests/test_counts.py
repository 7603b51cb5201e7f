"""What one call runs, counted: Triton launches and aten compute ops per forward and per
backward (tests/counters.py), for the triton backend, against the launch budget:

    forward:  1 launch (H built in the kernel), 2 with a prebuilt H (build_h), no aten compute op;
    backward: 3 launches (rows kernel, columns kernel, factor_grads), no aten compute op: every
              parameter gradient (the shared rule's two parts summed, biases, dense weights, the
              scale) and no gradient made for z.
"""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels.ops.triton import adapter
from compacter_kernels.ops.triton import config
from counters import forward_backward_counts
from utils import compacter_inputs, dense_inputs, phm_factors, why_backend_cannot_run

pytestmark = pytest.mark.skipif(why_backend_cannot_run("triton") is not None,
                                reason=str(why_backend_cannot_run("triton")))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _compacter(d, k, rank=1, residual=False, shared=True, M=37):
    inp = compacter_inputs(lead=(M,), d=d, k=k, n=4, rank=rank, dtype=torch.float32, device=DEVICE,
                           shared_rule=shared)
    r = torch.randn_like(inp.x, requires_grad=True) if residual else None
    fn = lambda *a: ck.compacter_adapter(*a, residual=r, scale=0.5, backend="triton")  # noqa: E731
    return fn, inp.args(), inp.tensors() + ([r] if residual else [])


BUDGET_CASES = [  # (d, k, rank, forward launches, residual, shared rule)
    (768, 24, 1, 1, False, True), (768, 24, 1, 1, True, False),  # H built in the kernels
    (1024, 64, 1, 2, True, True), (64, 16, 4, 2, False, False),  # H prebuilt (k = 64; rank 4)
]


@pytest.mark.parametrize("d,k,rank,fwd_launches,residual,shared", BUDGET_CASES,
                         ids=[f"d{c[0]}-k{c[1]}-r{c[2]}-res{int(c[4])}-shared{int(c[5])}" for c in BUDGET_CASES])
def test_compacter_launch_budget(d, k, rank, fwd_launches, residual, shared):
    prebuilt = config.prebuilds(4, rank, max(16, 1 << (k - 1).bit_length()))
    assert prebuilt == (fwd_launches == 2)
    fwd, bwd = forward_backward_counts(*_compacter(d, k, rank, residual, shared))
    assert not fwd.aten and not bwd.aten, (fwd.aten, bwd.aten)
    assert sum(fwd.launches.values()) == fwd_launches, fwd.launches
    assert dict(bwd.launches) == {"_adapter_rows_kernel": 1, "_adapter_cols_kernel": 1, "_factor_grads_kernel": 1}


def test_houlsby_and_phm_linear_launch_budget():
    x, wd, bd, wu, bu = dense_inputs(lead=(37,), d=96, k=24, dtype=torch.float32, device=DEVICE)
    fwd, bwd = forward_backward_counts(lambda *a: ck.adapter(*a, backend="triton"), (x, wd, bd, wu, bu),
                                       [x, wd, bd, wu, bu])
    assert (fwd.total, bwd.total) == (1, 3) and not fwd.aten and not bwd.aten, (fwd, bwd)
    x = torch.randn(37, 64, device=DEVICE, requires_grad=True)
    factors = phm_factors(4, 64, 32, 1, dtype=torch.float32, device=DEVICE, requires_grad=True)
    bias = torch.randn(32, device=DEVICE, requires_grad=True)
    fwd, bwd = forward_backward_counts(lambda *a: ck.phm_linear(*a, backend="triton"), (x, *factors, bias),
                                       [x, *factors, bias])
    assert (fwd.total, bwd.total) == (1, 3) and not fwd.aten and not bwd.aten, (fwd, bwd)


@pytest.mark.parametrize("residual", [False, True])
def test_linear_weights_are_read_transposed_without_a_copy(residual):
    """nn.Linear stores (out, in); the dense adapter takes (in, out): weight.t(), read as it is
    (no copy forward, none backward), every gradient as the reference's, and each weight's
    gradient in the weight's own layout (so that autograd does not copy it to match)."""
    M, d, k = 37, 48, 12
    x = torch.randn(M, d, device=DEVICE, requires_grad=True)
    w_down = (0.3 * torch.randn(k, d, device=DEVICE)).requires_grad_()  # (out, in), as nn.Linear
    w_up = (0.3 * torch.randn(d, k, device=DEVICE)).requires_grad_()
    b_down, b_up = (torch.randn(n, device=DEVICE, requires_grad=True) for n in (k, d))
    r = torch.randn(M, d, device=DEVICE, requires_grad=True) if residual else None
    leaves = [x, w_down, b_down, w_up, b_up] + ([r] if residual else [])
    args = (x, w_down.t(), b_down, w_up.t(), b_up)
    dy = torch.randn(M, d, device=DEVICE)

    def run(backend):
        y = ck.adapter(*args, residual=r, scale=0.5, backend=backend)
        return (y, *torch.autograd.grad(y, leaves, dy))

    for ours, want in zip(run("triton"), run("reference")):
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
        assert ours.stride() == want.stride()
    fwd, bwd = forward_backward_counts(lambda *a: ck.adapter(*a, residual=r, scale=0.5, backend="triton"), args,
                                       leaves)
    assert dict(fwd.launches) == {"_adapter_fwd_kernel": 1} and not fwd.aten, fwd
    assert sum(bwd.launches.values()) == 3 and not bwd.aten, bwd


@pytest.mark.parametrize("residual", [False, True])
def test_linear_weights_are_read_as_they_are(residual):
    """The AdapterHub swap-in's entry (`functional._adapter_linear`) takes nn.Linear weights:
    the values and gradients of adapter(x, weight.t(), ...), each weight's gradient in its own
    layout, and the same launches with no copy (the kernels read a weight's .t() as it is). A
    strided weight is copied first; create_graph=True gives the reference's second derivative."""
    from compacter_kernels import functional as F

    M, d, k = 37, 48, 12
    x = torch.randn(M, d, device=DEVICE, requires_grad=True)
    w_down = (0.3 * torch.randn(k, d, device=DEVICE)).requires_grad_()  # (out, in), as nn.Linear
    w_up_wide = (0.3 * torch.randn(d, 2 * k, device=DEVICE)).requires_grad_()
    w_up = w_up_wide[:, ::2]  # strided
    b_down, b_up = (torch.randn(n, device=DEVICE, requires_grad=True) for n in (k, d))
    r = torch.randn(M, d, device=DEVICE, requires_grad=True) if residual else None
    leaves = [x, w_down, b_down, w_up_wide, b_up] + ([r] if residual else [])
    dy = torch.randn(M, d, device=DEVICE)

    def linear(backend):
        return F._adapter_linear(x, w_down, b_down, w_up, b_up, activation="gelu", scale=0.5, residual=r,
                                 backend=backend)

    want = ck.adapter(x, w_down.t(), b_down, w_up.t(), b_up, residual=r, scale=0.5, backend="reference")
    expected = (want, *torch.autograd.grad(want, leaves, dy, retain_graph=True))
    for backend in ("triton", "reference"):
        y = linear(backend)
        for ours, ref in zip((y, *torch.autograd.grad(y, leaves, dy)), expected):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
            assert ours.stride() == ref.stride()
    (g,) = torch.autograd.grad((linear("triton") * dy).sum(), w_down, create_graph=True)
    (g_ref,) = torch.autograd.grad((want * dy).sum(), w_down, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(*(torch.autograd.grad(t.square().sum(), x)[0] for t in (g, g_ref)), rtol=1e-4,
                               atol=1e-4)
    contiguous_up = w_up.detach().contiguous().requires_grad_()
    fwd, bwd = forward_backward_counts(
        lambda *a: F._adapter_linear(*a, activation="gelu", scale=0.5, residual=r, backend="triton"),
        (x, w_down, b_down, contiguous_up, b_up), [x, w_down, b_down, contiguous_up, b_up])
    assert dict(fwd.launches) == {"_adapter_fwd_kernel": 1} and not fwd.aten, fwd
    assert sum(bwd.launches.values()) == 3 and not bwd.aten, bwd


def test_the_eager_reference_runs_13_kernels_forward_and_22_backward():
    """The unfused path the kernels replace (the paper's code, AdapterHub): the counts the
    package's case rests on."""
    inp = compacter_inputs(lead=(37,), d=768, k=24, n=4, rank=1, dtype=torch.float32, device=DEVICE)
    fwd, bwd = forward_backward_counts(lambda *a: ck.compacter_adapter(*a, backend="reference"), inp.args(),
                                       inp.tensors())
    assert (fwd.total, bwd.total) == (13, 22) and not fwd.launches, (fwd, bwd)


def test_the_counter_sees_an_extra_launch_and_an_extra_torch_op(monkeypatch):
    """Each count can fail: the columns kernel launched twice, or a torch op slipped into the backward."""
    columns, factor_grads = adapter._columns, adapter.factor_grads

    def twice(*args, **kwargs):
        columns(*args, **kwargs)
        return columns(*args, **kwargs)

    monkeypatch.setattr(adapter, "_columns", twice)
    _, bwd = forward_backward_counts(*_compacter(64, 16))
    assert bwd.launches["_adapter_cols_kernel"] == 2
    monkeypatch.setattr(adapter, "_columns", columns)

    def with_a_torch_op(partials, *args, **kwargs):
        partials.part.sum(0)
        return factor_grads(partials, *args, **kwargs)

    monkeypatch.setattr(adapter, "factor_grads", with_a_torch_op)
    _, bwd = forward_backward_counts(*_compacter(64, 16))
    assert dict(bwd.aten) == {"sum": 1}


@pytest.mark.parametrize("d,k,rank", [(96, 24, 1), (64, 16, 4)])
def test_gradients_are_bit_identical_run_to_run(d, k, rank):
    fn, args, leaves = _compacter(d, k, rank, residual=True, M=200)
    dy = torch.randn(200, d, device=DEVICE)
    first = torch.autograd.grad(fn(*args), leaves, dy)
    again = torch.autograd.grad(fn(*args), leaves, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_forward_and_backward_read_nothing_back_to_the_host():
    """CUDA-graph capturable: no aten op at all runs between the launches, so none reads a value
    back to the host (.item(), a data-dependent branch or allocation would show up here as
    _local_scalar_dense, is_nonzero, nonzero, ...). The launches' own arguments are host values
    (shapes, strides, the scale)."""
    for residual in (False, True):
        fwd, bwd = forward_backward_counts(*_compacter(1024, 64, residual=residual))
        assert not fwd.aten and not bwd.aten, (fwd.aten, bwd.aten)
