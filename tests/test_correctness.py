"""Correctness beyond the plain call, on every backend this machine runs: every argument in odd
layouts, second derivatives, torch.func, torch.compile in a fresh process, the residual's own
gradient, bad input named, and threads."""

import subprocess
import sys
import threading

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import reference as ref
from compacter_kernels.ops.triton import config, launch
from counters import counting
from utils import (CUDA_EMULATED, ON_GPU, check_op, checkout_env, compacter_inputs, dense_inputs, double_leaves,
                   phm_factors, why_backend_cannot_run)

DEVICE = "cuda" if ON_GPU else "cpu"
F32 = torch.float32


def _backends():
    kernels = [name for name in ("triton", "cuda") if why_backend_cannot_run(name) is None]
    return kernels if CUDA_EMULATED else ["reference", *kernels]


@pytest.fixture(params=_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


# ---- the three ops, each as a function of all its tensors (residual last) ------------------------

def _compacter(backend, scale=0.7):
    def f(x, rd, ld, rgd, bd, ru, lu, rgu, bu, residual=None):
        return ck.compacter_adapter(x, rd, ld, rgd, bd, ru, lu, rgu, bu, activation="gelu", scale=scale,
                                    residual=residual, backend=backend)
    return f


def _adapter(backend, scale=-1.3):
    def f(x, wd, bd, wu, bu, residual=None):
        return ck.adapter(x, wd, bd, wu, bu, activation="silu", scale=scale, residual=residual, backend=backend)
    return f


def _phm_linear(backend):
    return lambda x, rule, left, right, bias: ck.phm_linear(x, rule, left, right, bias, backend=backend)


def _op_inputs(op, dtype=F32, lead=(5,)):
    """(function of a backend, fresh random tensors in the function's argument order)."""
    if op == "compacter":
        inp = compacter_inputs(lead=lead, d=16, k=8, n=4, rank=2, dtype=dtype, device=DEVICE, shared_rule=False)
        return _compacter, [*inp.args(), torch.randn_like(inp.x).requires_grad_()]
    if op == "adapter":
        args = dense_inputs(lead=lead, d=16, k=8, dtype=dtype, device=DEVICE)
        return _adapter, [*args, torch.randn_like(args[0]).requires_grad_()]
    rule, left, right = phm_factors(4, 16, 12, 2, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(*lead, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    return _phm_linear, [x, rule, left, right, torch.randn(12, dtype=dtype, device=DEVICE, requires_grad=True)]


OPS = ["compacter", "adapter", "phm_linear"]
ARG_COUNT = {"compacter": 10, "adapter": 6, "phm_linear": 5}


# ---- 1. every tensor argument strided, expanded or at a storage offset ---------------------------

def _odd_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with t's shape and fresh random values (grad-requiring as t) in an odd layout."""
    g = t.requires_grad
    if layout == "strided":  # every other element of a wider tensor along the last dim
        base = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device, requires_grad=g)
        return base[..., ::2]
    if layout == "expanded":  # stride 0 along the first dim
        base = torch.randn(1, *t.shape[1:], dtype=t.dtype, device=t.device, requires_grad=g)
        return base.expand(t.shape)
    base = torch.randn(t.numel() + 3, dtype=t.dtype, device=t.device, requires_grad=g)  # storage offset 3
    return base[3:].view(t.shape)


@pytest.mark.parametrize("h_budget", [0, 10**9], ids=["prebuilt_h", "in_kernel_h"])
@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
@pytest.mark.parametrize("op", OPS)
def test_every_argument_in_an_odd_layout(backend, op, layout, h_budget, monkeypatch):
    if h_budget and backend != "triton":
        pytest.skip("only the triton backend builds H inside its kernels")
    monkeypatch.setattr(config, "INKERNEL_H_BUDGET", h_budget)
    make, args = _op_inputs(op)
    for i, t in enumerate(args):
        if t is None:
            continue
        odd = list(args)
        odd[i] = _odd_layout(t, layout)
        assert not odd[i].is_contiguous() or odd[i].storage_offset() > 0
        check_op(make(backend), make("reference"), odd, F32, f"{op} argument #{i} {layout}")


# ---- 2. second derivatives: gradient penalties and Hessian-vector products -----------------------

def _second_order(fn, args, dy, v):
    """(penalty gradients, Hessian-vector products) of fn at args, every differentiable argument."""
    leaves = [t for t in args if t is not None]
    y = fn(*args)
    g = torch.autograd.grad(y, leaves, dy, create_graph=True)
    penalty = (g[0] * g[0]).sum() + (y * y).mean()  # a gradient penalty on dx
    pen = torch.autograd.grad(penalty, leaves, retain_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), leaves, allow_unused=True,
                             materialize_grads=True)
    return pen, hv


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_second_derivatives_match_the_reference(backend, op, residual):
    make, args = _op_inputs(op)
    if op != "phm_linear" and not residual:
        args[-1] = None
    dy = torch.randn(5, 12 if op == "phm_linear" else 16, device=DEVICE)
    v = [torch.randn_like(t) for t in args if t is not None]
    pen, hv = _second_order(make(backend), args, dy, v)
    memo = {}
    pen64, hv64 = _second_order(make("reference"), double_leaves(args, memo), dy.double(), [t.double() for t in v])
    for what, got, want in (("penalty", pen, pen64), ("Hv", hv, hv64)):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-3, msg=lambda m: f"{what} #{i}: {m}")


def test_second_derivatives_with_a_shared_rule(backend):
    inp = compacter_inputs(lead=(5,), d=16, k=8, n=4, rank=1, dtype=F32, device=DEVICE, shared_rule=True)
    dy = torch.randn(5, 16, device=DEVICE)
    v = [torch.randn_like(t) for t in inp.args() if t is not None]
    got = _second_order(_compacter(backend), list(inp.args()), dy, v)
    memo = {}
    want = _second_order(_compacter("reference"), double_leaves(inp.args(), memo), dy.double(),
                         [t.double() for t in v])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-3)


# ---- 3. torch.func transforms ---------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_and_vmap_match_the_reference(backend, op):
    make, args = _op_inputs(op, lead=(3, 4))
    args = [None if t is None else t.detach() for t in args]
    if op != "phm_linear":
        args[-1] = None  # no residual: x alone is transformed
    fn, rf = make(backend), make("reference")
    rest = args[1:]
    for transform in (lambda f: torch.func.grad(lambda x: f(x, *rest).square().sum()),
                      lambda f: torch.func.vmap(lambda x: f(x, *rest)),
                      lambda f: torch.func.jacrev(lambda x: f(x, *rest).sum(0))):
        torch.testing.assert_close(transform(fn)(args[0]), transform(rf)(args[0]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_ad_gives_every_tangent(backend, op, frozen):
    """torch.autograd.forward_ad and torch.func.jvp: y's tangent for dual x and (unless frozen)
    dual parameters, with frozen weights, and after an earlier call of the same shapes (never a
    y without its tangent)."""
    import torch.autograd.forward_ad as fwAD

    make, args = _op_inputs(op, lead=(3, 4))
    args = [None if t is None else t.detach() for t in args]
    fn, rf = make(backend), make("reference")
    duals = [0] if frozen else [i for i, t in enumerate(args) if t is not None]
    tangents = {i: torch.randn_like(args[i]) for i in duals}
    _, want = torch.func.jvp(lambda *d: rf(*[d[duals.index(i)] if i in duals else t for i, t in enumerate(args)]),
                             tuple(args[i] for i in duals), tuple(tangents[i] for i in duals))
    fn(*args)  # an earlier call of the same shapes
    with fwAD.dual_level():
        y = fn(*[fwAD.make_dual(t, tangents[i]) if i in duals else t for i, t in enumerate(args)])
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, want, atol=1e-5, rtol=1e-4)


# ---- 4. torch.compile(fullgraph=True) in a fresh process ------------------------------------------

_COMPILE_SCRIPT = """
import os, sys
import torch
import compacter_kernels as ck
backend = sys.argv[1]
x = torch.randn(6, 16, requires_grad=True)
wd, bd, wu, bu = torch.randn(16, 8) / 4, torch.randn(8), torch.randn(8, 16) / 3, torch.randn(16)
f = torch.compile(lambda x: ck.adapter(x, wd, bd, wu, bu, backend=backend), backend="aot_eager", fullgraph=True)
y = f(x)
torch.testing.assert_close(y, ck.reference.adapter(x, wd, bd, wu, bu), atol=1e-5, rtol=1e-5)
y.sum().backward()
print("OK", backend)
"""


@pytest.mark.parametrize("name", ["reference", "triton", "auto"])
def test_fullgraph_compile_in_a_fresh_process(name):
    if CUDA_EMULATED:
        pytest.skip("the main run tests this")
    if name == "triton" and why_backend_cannot_run("triton"):
        pytest.skip(why_backend_cannot_run("triton"))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, name], capture_output=True, text=True,
                         env=checkout_env(), timeout=300)
    assert out.returncode == 0 and f"OK {name}" in out.stdout, out.stderr[-3000:]


# ---- 5. the residual's gradient is a tensor of its own --------------------------------------------

@pytest.mark.parametrize("op", ["compacter", "adapter"])
def test_residual_grad_is_not_the_callers_dy(backend, op):
    make, args = _op_inputs(op)
    residual = args[-1]
    y = make(backend)(*args)
    dy = torch.randn(5, 16, device=DEVICE)
    dy_before = dy.clone()
    y.view(-1).backward(dy.view(-1))  # dy reaches the op as a view: autograd may keep it
    assert torch.equal(residual.grad, dy)
    residual.grad.add_(1.0)
    assert torch.equal(dy, dy_before), "residual.grad aliases the dy passed to backward()"


# ---- 6. bad input: ValueError / TypeError naming the argument --------------------------------------

def _compacter_call(backend, **change):
    inp = compacter_inputs(lead=(3,), d=16, k=8, n=4, rank=1, dtype=F32, device=DEVICE, requires_grad=False)
    names = ("x", "rule_down", "left_down", "right_down", "bias_down", "rule_up", "left_up", "right_up", "bias_up")
    kw = dict(zip(names, inp.args()))
    kw.update(change)
    opts = {k: kw.pop(k) for k in ("activation", "scale", "residual") if k in kw}
    return lambda: ck.compacter_adapter(*kw.values(), backend=backend, **opts)


def _adapter_call(backend, **change):
    x, wd, bd, wu, bu = dense_inputs(lead=(3,), d=16, k=8, dtype=F32, device=DEVICE, requires_grad=False)
    kw = dict(x=x, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
    kw.update(change)
    opts = {k: kw.pop(k) for k in ("activation", "scale") if k in kw}
    return lambda: ck.adapter(*kw.values(), backend=backend, **opts)


def _phm_weight_call(**change):
    rule, left, right = phm_factors(4, 16, 8, 2, dtype=F32)
    kw = dict(rule=rule, left=left, right=right)
    kw.update(change)
    return lambda: ck.phm_weight(**kw)


BAD_INPUTS = [
    (_compacter_call, dict(activation=None), ValueError, "activation must be one of .* got None"),
    (_compacter_call, dict(activation=3), ValueError, "activation must be one of .* got 3"),
    (_compacter_call, dict(scale=10**400), ValueError, "scale must be a finite real number"),
    (_compacter_call, dict(scale=float("nan")), ValueError, "scale must be a finite real number"),
    (_compacter_call, dict(x=torch.randn(3, 12)), ValueError, "x has 12 features, the adapter .* expects 16"),
    (_compacter_call, dict(x=torch.randn(3, 17)), ValueError, "x has 17 features, the adapter .* expects 16"),
    (_compacter_call, dict(rule_down=None), TypeError, "rule_down must be a torch.Tensor, got NoneType"),
    (_compacter_call, dict(left_up=None), TypeError, "left_up must be a torch.Tensor, got NoneType"),
    (_adapter_call, dict(w_down=None), TypeError, "w_down must be a torch.Tensor, got NoneType"),
    (_adapter_call, dict(w_up=None), TypeError, "w_up must be a torch.Tensor, got NoneType"),
    (_adapter_call, dict(activation=None), ValueError, "activation must be one of .* got None"),
    (_adapter_call, dict(scale=-10**400), ValueError, "scale must be a finite real number"),
    (_adapter_call, dict(x=torch.randn(3, 512)), ValueError, "x has 512 features, the adapter .* expects 16"),
    (_adapter_call, dict(b_up=torch.randn(4, 4)), ValueError, r"b_up must have shape \(16,\)"),
]


@pytest.mark.parametrize("call,change,exc,match", BAD_INPUTS, ids=[m for *_, m in BAD_INPUTS])
def test_bad_input_is_named_on_every_backend(backend, call, change, exc, match):
    if "x" in change:
        change = {**change, "x": change["x"].to(DEVICE)}
    with pytest.raises(exc, match=match):
        call(backend, **change)()


BAD_PHM_WEIGHT = [
    (dict(rule=torch.randint(0, 3, (4, 4, 4))), TypeError, "rule must be a floating tensor"),
    (dict(rule=None), TypeError, "rule must be a torch.Tensor, got NoneType"),
    (dict(rule=torch.randn(4, 4)), ValueError, "rule must be 3-D"),
    (dict(rule=torch.randn(4, 4, 2)), ValueError, r"rule must have shape \(4, 4, 4\)"),
    (dict(left=torch.randn(2, 4, 2)), ValueError, r"left must have shape \(4, 4, 2\)"),
    (dict(right=torch.randn(4, 3, 2)), ValueError, r"right must have shape \(4, 2, 2\)"),
    (dict(right=torch.randn(4, 2, 2, dtype=torch.float64)), TypeError, "right has dtype torch.float64 but rule"),
    (dict(left="W"), TypeError, "left must be a torch.Tensor, got str"),
]


@pytest.mark.parametrize("change,exc,match", BAD_PHM_WEIGHT, ids=[m for *_, m in BAD_PHM_WEIGHT])
def test_bad_phm_weight_input_is_named(change, exc, match):
    with pytest.raises(exc, match=match):
        _phm_weight_call(**change)()


BAD_LAYERS = [
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=0), ValueError, "phm_dim must be >= 1, got 0"),
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=-4), ValueError, "phm_dim must be >= 1, got -4"),
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=2.0), TypeError, "phm_dim must be an integer, got float"),
    (lambda: ck.nn.PHMLinear(16, 8, rank=0), ValueError, "rank must be >= 1, got 0"),
    (lambda: ck.nn.CompacterAdapter(64, phm_dim=0), ValueError, "phm_dim must be >= 1, got 0"),
    (lambda: ck.nn.CompacterAdapter(64, phm_dim=-4), ValueError, "phm_dim must be >= 1, got -4"),
    (lambda: ck.nn.CompacterAdapter(64, reduction_factor=float("nan")), ValueError, "reduction_factor must be a finite"),
    (lambda: ck.nn.CompacterAdapter(64, reduction_factor=0), ValueError, "reduction_factor must be a finite"),
    (lambda: ck.nn.CompacterAdapter(64, reduction_factor="8"), TypeError, "reduction_factor must be a real number"),
    (lambda: ck.nn.CompacterAdapter(64, reduction_factor=128), ValueError, "gives a bottleneck of 0"),
    (lambda: ck.nn.CompacterAdapter(0, bottleneck=8), ValueError, "d_model must be >= 1, got 0"),
    (lambda: ck.nn.CompacterAdapter(66, bottleneck=8), ValueError, "d_model=66 must be a positive multiple of phm_dim=4"),
    (lambda: ck.nn.CompacterAdapter(64, activation=None), ValueError, "activation must be one of"),
    (lambda: ck.nn.CompacterAdapter(64, scale=float("inf")), ValueError, "scale must be a finite"),
    (lambda: ck.nn.HoulsbyAdapter(0, 4), ValueError, "d_model must be >= 1, got 0"),
    (lambda: ck.nn.HoulsbyAdapter(16, 2.5), TypeError, "bottleneck must be an integer"),
    (lambda: ck.nn.PHMRule(0), ValueError, "phm_dim must be >= 1, got 0"),
]


@pytest.mark.parametrize("make,exc,match", BAD_LAYERS, ids=[m for *_, m in BAD_LAYERS])
def test_bad_layer_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("op", ["adapter", "phm_linear"])
def test_zero_features_behave_as_the_reference_on_every_backend(backend, op):
    """An empty feature width (d = 0) is no kernel to launch: every backend returns the
    reference's empty result and its gradients (the biases' included)."""
    if op == "adapter":
        args = [torch.randn(4, 0, device=DEVICE, requires_grad=True), torch.randn(0, 3, device=DEVICE),
                torch.randn(3, device=DEVICE, requires_grad=True), torch.randn(3, 0, device=DEVICE),
                torch.randn(0, device=DEVICE)]
        fn = lambda be: lambda *a: ck.adapter(*a, backend=be)  # noqa: E731
    else:
        args = [torch.randn(4, 0, device=DEVICE), *phm_factors(4, 0, 8, 1, dtype=F32, device=DEVICE),
                torch.randn(8, device=DEVICE, requires_grad=True)]
        fn = lambda be: lambda *a: ck.phm_linear(*a, backend=be)  # noqa: E731
    y, expected = fn(backend)(*args), fn("reference")(*args)
    assert y.shape == expected.shape and torch.equal(y, expected)
    leaves = [t for t in args if t is not None and t.requires_grad]
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True),
                    torch.autograd.grad(expected, leaves, dy, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("op", ["compacter", "adapter"])
def test_a_bottleneck_wider_than_the_kernels_runs_as_matmuls(backend, op, tasks):
    """A bottleneck past the fused kernels' width (`config.FUSED_MAX_KP`: no tile fits a GPU's
    shared memory or registers there) runs as separate matmuls: every backend gives the
    reference's values and gradients, and the Triton backend launches none of its adapter kernels."""
    k = config.FUSED_MAX_KP + 8
    n = 2 if op == "compacter" else 1
    d = 6 * n
    x = torch.randn(3, 2, d, device=DEVICE, requires_grad=True)
    stack = (tasks,) if tasks > 1 else ()
    if op == "compacter":
        rule, l_d, r_d = phm_factors(n, d, k, 2, dtype=F32, device=DEVICE, requires_grad=True)
        _, l_u, r_u = phm_factors(n, k, d, 2, dtype=F32, device=DEVICE, requires_grad=True)
        params = [rule, l_d.expand(*stack, *l_d.shape), r_d.expand(*stack, *r_d.shape), torch.randn(*stack, k),
                  rule, l_u.expand(*stack, *l_u.shape), r_u.expand(*stack, *r_u.shape), torch.randn(*stack, d)]
    else:
        params = [torch.randn(*stack, d, k) / 3, torch.randn(*stack, k), torch.randn(*stack, k, d) / 9,
                  torch.randn(*stack, d)]
    params = [p if p.requires_grad else p.to(DEVICE).requires_grad_() for p in params]
    ids = torch.randint(0, tasks, (3, 2), device=DEVICE)

    def fn(be):
        def f(x, *params):
            if tasks == 1:
                return (ck.compacter_adapter if op == "compacter" else ck.adapter)(x, *params, backend=be)
            multi = ck.multitask_compacter_adapter if op == "compacter" else ck.multitask_adapter
            return multi(x, ids, *params, backend=be)
        return f

    with counting() as counts:
        check_op(fn(backend), fn("reference"), [x, *params], F32, f"{op} k={k} tasks={tasks}")
    assert not counts.launches, counts.launches  # no Triton kernel: the matmuls are torch's


# ---- 7. two threads at once give the sequential results --------------------------------------------

def test_two_threads_give_the_sequential_results(backend):
    calls = []
    for op in OPS:
        make, args = _op_inputs(op)
        calls.append((make(backend), args))

    def run(fn, args):
        y = fn(*args)
        leaves = [t for t in args if t is not None]
        return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))

    expected = [run(fn, args) for fn, args in calls]
    results, errors = {}, []

    def worker(w):
        try:
            for rep in range(2):
                for i, (fn, args) in enumerate(calls):
                    results[(w, rep, i)] = run(fn, args)
        except Exception as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (w, rep, i), got in results.items():
        for a, b in zip(got, expected[i]):
            assert torch.equal(a, b), f"thread {w}, repeat {rep}, op {OPS[i]}"


def test_a_repeated_call_skips_no_check_that_matters():
    """After a good call, every bad variant of the same arguments still raises its named error
    (nothing about a call is remembered)."""
    good = _compacter_call("reference")
    good()
    for call, change, exc, match in BAD_INPUTS:
        if call is _compacter_call:
            with pytest.raises(exc, match=match):
                call("reference", **change)()
    with pytest.raises(TypeError, match="right_down has dtype torch.float64"):
        _compacter_call("reference", right_down=torch.randn(4, 1, 2, dtype=torch.float64))()
    with pytest.raises(ValueError, match=r"activation must be one of .* got \['gelu'\]"):
        _compacter_call("reference", activation=["gelu"])()  # unhashable: no signature, full checks
