"""A repeated fused-adapter call goes by its signature's plan (compacter_kernels/functional.py
`_planned`): the checks, the backend's choice and the entry point's layers run once per
signature. Here: a planned call gives what the checked one gives, values and gradients, and
any change a check or the route depends on is checked again (never a stale route). Runs for
the triton backend (interpreter) and, in the emulated run, the cuda backend."""

import math

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import _validation
from compacter_kernels import functional as F
from compacter_kernels import reference as ref
from utils import compacter_inputs, dense_inputs, why_backend_cannot_run

BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    why = why_backend_cannot_run(request.param)
    if why is not None:
        pytest.skip(why)
    monkeypatch.setattr(F, "_PLANS", {})  # this test's plans only
    return request.param


def _no_checks(monkeypatch):
    """From here on a checked call fails the test: only planned calls may run."""
    def checked_again(*args, **kwargs):
        raise AssertionError("a repeated call was checked again")
    for name in ("check_compacter_adapter", "check_adapter", "check_adapter_linear"):
        monkeypatch.setattr(_validation, name, checked_again)


def _fwd_bwd(fn, leaves, dy):
    y = fn()
    return y, torch.autograd.grad(y, leaves, dy)


def test_a_repeated_compacter_call_is_planned_and_gives_the_same_values_and_gradients(backend, monkeypatch):
    inp = compacter_inputs(lead=(2, 5), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    r = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 16)
    leaves = (*inp.tensors(), r)

    def call():
        return ck.compacter_adapter(*inp.args(), activation="silu", scale=0.5, residual=r, backend=backend)

    y1, g1 = _fwd_bwd(call, leaves, dy)
    assert len(F._PLANS) == 1 and all(F._PLANS.values())  # planned
    _no_checks(monkeypatch)
    y2, g2 = _fwd_bwd(call, leaves, dy)
    assert torch.equal(y2, y1) and all(torch.equal(a, b) for a, b in zip(g2, g1))
    expected = ref.compacter_adapter(*inp.args(), activation="silu", scale=0.5, residual=r)
    torch.testing.assert_close(y2, expected, atol=3e-4, rtol=1e-3)
    with torch.no_grad():  # the same plan, the inference route (no z): the same y
        assert torch.equal(call(), y1.detach())


def test_repeated_dense_and_linear_calls_are_planned(backend, monkeypatch):
    x, wd, bd, wu, bu = dense_inputs(lead=(7,), d=16, k=8, dtype=torch.float32)
    dy = torch.randn(7, 16)
    linear_wd, linear_wu = wd.detach().t().contiguous().requires_grad_(), wu.detach().t().contiguous().requires_grad_()
    calls = {"adapter": (lambda: ck.adapter(x, wd, bd, wu, bu, backend=backend), (x, wd, bd, wu, bu)),
             "linear": (lambda: F._adapter_linear(x, linear_wd, bd, linear_wu, bu, activation="gelu", scale=1.0,
                                                  residual=None, backend=backend), (x, linear_wd, bd, linear_wu, bu))}
    if not hasattr(ck.backends.IMPLEMENTATIONS[backend]["adapter"], "linear"):
        del calls["linear"]  # a backend that copies nn.Linear's weights: that route is checked every time
    first = {name: _fwd_bwd(fn, leaves, dy) for name, (fn, leaves) in calls.items()}
    _no_checks(monkeypatch)
    for name, (fn, leaves) in calls.items():
        y, grads = _fwd_bwd(fn, leaves, dy)
        y1, g1 = first[name]
        assert torch.equal(y, y1) and all(torch.equal(a, b) for a, b in zip(grads, g1)), name
    if "linear" in first:
        torch.testing.assert_close(first["linear"][0], first["adapter"][0])
        torch.testing.assert_close(first["linear"][1][1], first["adapter"][1][1].t())


def test_a_call_that_differs_from_a_planned_one_is_checked_again(backend):
    inp = compacter_inputs(lead=(6,), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    args = list(inp.args())
    ck.compacter_adapter(*args, backend=backend)  # planned
    with pytest.raises(ValueError, match="scale must be a finite real number"):
        ck.compacter_adapter(*args, scale=math.nan, backend=backend)
    with pytest.raises(ValueError, match="activation must be one of"):
        ck.compacter_adapter(*args, activation="tanh", backend=backend)
    with pytest.raises(TypeError, match="bias_up has dtype torch.float64"):
        ck.compacter_adapter(*args[:-1], args[-1].double(), backend=backend)
    with pytest.raises(ValueError, match=r"residual must have shape \(6, 16\)"):
        ck.compacter_adapter(*args, residual=torch.randn(6, 1), backend=backend)
    # A parameter changed in place (as Module.to does: same object, new dtype): checked again.
    bias_up = args[-1]
    bias_up.data = bias_up.data.double()
    with pytest.raises(TypeError, match="bias_up has dtype torch.float64"):
        ck.compacter_adapter(*args, backend=backend)
    bias_up.data = bias_up.data.float()
    # Layouts the plan did not see: a strided parameter and a strided x, each right.
    left_down = torch.randn(4, 4, 2)[:, :, :1]  # (4, 4, 1), not contiguous
    assert not left_down.is_contiguous() and left_down.shape == args[2].shape
    changed = [*args[:2], left_down, *args[3:]]
    for _ in range(2):  # checked, then by its key's "no plan" (the entry point copies left_down)
        torch.testing.assert_close(ck.compacter_adapter(*changed, backend=backend), ref.compacter_adapter(*changed),
                                   atol=3e-4, rtol=1e-3)
    x = torch.randn(6, 32)[:, ::2]
    torch.testing.assert_close(ck.compacter_adapter(x, *args[1:], backend=backend),
                               ref.compacter_adapter(x, *args[1:]), atol=3e-4, rtol=1e-3)


def test_the_plan_key_reads_every_tensor_and_the_autocast_state():
    inp = compacter_inputs(lead=(3,), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    what, params = ("compacter_adapter", "triton", "gelu"), inp.args()[1:]
    key = F._plan_key(what, inp.x, None, params)
    assert key == F._plan_key(what, inp.x.clone(), None, tuple(p.clone() for p in params))  # values do not count
    assert key != F._plan_key(what, inp.x, inp.x, params)
    assert key != F._plan_key(what, inp.x.t().contiguous().t(), None, params)  # strides
    for i, p in enumerate(params):
        for other in (p.double(), p.detach().clone().transpose(0, -1).contiguous().transpose(0, -1)):
            if other.stride() == p.stride() and other.dtype == p.dtype:
                continue
            assert key != F._plan_key(what, inp.x, None, params[:i] + (other,) + params[i + 1:]), i
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert key != F._plan_key(what, inp.x, None, params)
    assert F._plan_key(what, [1.0] * 16, None, params) is None
    assert F._plan_key(what, torch.empty(3, 16, device="meta"), None, params) is None


def test_a_plan_made_without_gradients_serves_a_training_call(backend):
    """The route (inference or the autograd Function) is chosen per call, not fixed in the plan."""
    inp = compacter_inputs(lead=(5,), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    with torch.no_grad():
        y0 = ck.compacter_adapter(*inp.args(), backend=backend)  # planned here, in no_grad
    y = ck.compacter_adapter(*inp.args(), backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inp.tensors(), dy)
    expected = torch.autograd.grad(ref.compacter_adapter(*inp.args()), inp.tensors(), dy)
    assert torch.equal(y.detach(), y0)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=3e-4, rtol=1e-3)
