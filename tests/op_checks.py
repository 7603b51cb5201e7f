"""The checks every op file applies to its op, written once: the backends a test runs on, the ops
as functions of all their tensors, and the generic checks (odd layouts, second derivatives,
torch.func, forward-mode AD, the residual's gradient, empty widths, a bottleneck wider than the
kernels, autocast) as mixin classes that each op file instantiates for its op::

    class TestOpChecks(op_checks.OpChecks, op_checks.ResidualChecks):
        OP = "compacter"

so that every op gets the same checks on every backend. The op files (tests/test_<op>.py) import
the fixtures below by name; pytest then uses them there.
"""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import reference as ref
from compacter_kernels.ops.triton import config, grads, launch
from counters import counting
from utils import (CUDA_EMULATED, ON_GPU, check_op, compacter_inputs, dense_inputs, double_leaves, phm_factors,
                   why_backend_cannot_run)

DEVICE = "cuda" if ON_GPU else "cpu"
F32 = torch.float32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_BACKENDS = ["triton", "cuda"]

# What tests only the reference (the reference against itself, argument checks on the CPU before
# any kernel): the main run has it; the emulated run tests the cuda backend and skips it.
reference_only = pytest.mark.skipif(CUDA_EMULATED, reason="the main run tests this (it runs no kernel backend)")


def usable_backends():
    """Every backend this run tests: the reference and the kernel backends that run here (the
    emulated run: the cuda backend alone)."""
    kernels = [name for name in KERNEL_BACKENDS if why_backend_cannot_run(name) is None]
    return kernels if CUDA_EMULATED else ["reference", *kernels]


# ---- fixtures (an op file imports them by name) ----------------------------------------------------

@pytest.fixture(params=usable_backends())
def backend(request):
    """Every backend this run tests, the reference included (checks against the reference in fp64)."""
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Each kernel backend, skipped with the reason where it cannot run (checks against the reference)."""
    why = why_backend_cannot_run(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel fails to write fails the test."""
    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture(params=["in_kernel", "prebuilt"])
def h_build(request, monkeypatch, kernel_backend):
    """Both ways the Triton kernels get H: tiles built in registers, or H built once per call."""
    if kernel_backend != "triton" and request.param == "in_kernel":
        pytest.skip(f"only the triton backend builds H inside its kernels; {kernel_backend} runs once, as prebuilt")
    monkeypatch.setattr(config, "INKERNEL_H_BUDGET", 10**9 if request.param == "in_kernel" else 0)


@pytest.fixture
def narrow_column_chunks(monkeypatch):
    """factor_grads in chunks of 8 columns (config.GRADS_MAX_COLS; 2048 on a GPU, where only
    phm_linear d -> 4d at d >= 4096 with n <= 4 has wider rows): d left summed over the chunks.
    The triton backend only (the others have no factor_grads)."""
    if why_backend_cannot_run("triton") is not None:
        pytest.skip(why_backend_cannot_run("triton"))
    cached = (config.grads_tile, grads._projection_plan, grads.factor_grads_plan)
    monkeypatch.setattr(config, "GRADS_MAX_COLS", 8)
    for f in cached:
        f.cache_clear()
    yield
    for f in cached:
        f.cache_clear()


def skip_unsupported(dtype, backend):
    if dtype == torch.bfloat16 and not ON_GPU and backend == "triton":
        pytest.skip("bf16 tl.dot is silently wrong in the Triton interpreter: bf16 is tested on a GPU")


def kernel(op, backend):
    """ck.<op> on the given backend."""
    return lambda *a, **kw: getattr(ck, op)(*a, backend=backend, **kw)


# ---- the three single-task ops, each as a function of all its tensors (residual last) ---------------

def compacter(backend, scale=0.7):
    def f(x, rd, ld, rgd, bd, ru, lu, rgu, bu, residual=None):
        return ck.compacter_adapter(x, rd, ld, rgd, bd, ru, lu, rgu, bu, activation="gelu", scale=scale,
                                    residual=residual, backend=backend)
    return f


def adapter(backend, scale=-1.3):
    def f(x, wd, bd, wu, bu, residual=None):
        return ck.adapter(x, wd, bd, wu, bu, activation="silu", scale=scale, residual=residual, backend=backend)
    return f


def adapter_linear(backend, scale=-1.3):
    """ck.adapter's nn.Linear-weights form (the AdapterHub swap-in's entry): weights (out, in)."""
    from compacter_kernels import functional

    def f(x, weight_down, bd, weight_up, bu, residual=None):
        return functional._adapter_linear(x, weight_down, bd, weight_up, bu, activation="silu", scale=scale,
                                          residual=residual, backend=backend)
    return f


def phm_linear(backend):
    return lambda x, rule, left, right, bias: ck.phm_linear(x, rule, left, right, bias, backend=backend)


def op_inputs(op, dtype=F32, lead=(5,)):
    """(function of a backend, fresh random tensors in the function's argument order)."""
    if op == "compacter":
        inp = compacter_inputs(lead=lead, d=16, k=8, n=4, rank=2, dtype=dtype, device=DEVICE, shared_rule=False)
        return compacter, [*inp.args(), torch.randn_like(inp.x).requires_grad_()]
    if op == "adapter":
        args = dense_inputs(lead=lead, d=16, k=8, dtype=dtype, device=DEVICE)
        return adapter, [*args, torch.randn_like(args[0]).requires_grad_()]
    if op == "adapter_linear":  # nn.Linear weights (out, in): fresh leaves of their own
        x, wd, bd, wu, bu = dense_inputs(lead=lead, d=16, k=8, dtype=dtype, device=DEVICE)
        weight_down, weight_up = (w.detach().t().contiguous().requires_grad_() for w in (wd, wu))
        return adapter_linear, [x, weight_down, bd, weight_up, bu, torch.randn_like(x).requires_grad_()]
    rule, left, right = phm_factors(4, 16, 12, 2, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(*lead, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    return phm_linear, [x, rule, left, right, torch.randn(12, dtype=dtype, device=DEVICE, requires_grad=True)]


OPS = ["compacter", "adapter", "phm_linear"]


# ---- the generic checks ------------------------------------------------------------------------------

def _odd_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with t's shape and fresh random values (grad-requiring as t) in an odd layout."""
    g = t.requires_grad
    if layout == "strided":  # every other element of a wider tensor along the last dim
        base = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device, requires_grad=g)
        return base[..., ::2]
    if layout == "expanded":  # stride 0 along the first dim
        base = torch.randn(1, *t.shape[1:], dtype=t.dtype, device=t.device, requires_grad=g)
        return base.expand(t.shape)
    if layout == "transposed":  # the last two dims stored swapped (an nn.Linear weight's .t())
        base = torch.randn(*t.shape[:-2], t.shape[-1], t.shape[-2], dtype=t.dtype, device=t.device,
                           requires_grad=g)
        return base.transpose(-1, -2)
    base = torch.randn(t.numel() + 3, dtype=t.dtype, device=t.device, requires_grad=g)  # storage offset 3
    return base[3:].view(t.shape)


def second_order(fn, args, dy, v):
    """(penalty gradients, Hessian-vector products) of fn at args, every differentiable argument."""
    leaves = [t for t in args if t is not None]
    y = fn(*args)
    g = torch.autograd.grad(y, leaves, dy, create_graph=True)
    penalty = (g[0] * g[0]).sum() + (y * y).mean()  # a gradient penalty on dx
    pen = torch.autograd.grad(penalty, leaves, retain_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), leaves, allow_unused=True,
                             materialize_grads=True)
    return pen, hv


class OpChecks:
    """What every op is checked for on every backend (OP: "compacter", "adapter", "adapter_linear"
    or "phm_linear")."""

    OP: str

    # 1. every tensor argument strided, expanded, at a storage offset or (2-D and wider) transposed
    @pytest.mark.parametrize("h_budget", [0, 10**9], ids=["prebuilt_h", "in_kernel_h"])
    @pytest.mark.parametrize("layout", ["strided", "expanded", "offset", "transposed"])
    def test_every_argument_in_an_odd_layout(self, backend, layout, h_budget, monkeypatch):
        if h_budget and backend != "triton":
            pytest.skip("only the triton backend builds H inside its kernels")
        monkeypatch.setattr(config, "INKERNEL_H_BUDGET", h_budget)
        op = self.OP
        make, args = op_inputs(op)
        for i, t in enumerate(args):
            if t is None or layout == "transposed" and (t.dim() < 2 or min(t.shape[-2:]) < 2):
                continue  # a transpose of a vector or of a side of 1 is laid out as it was
            odd = list(args)
            odd[i] = _odd_layout(t, layout)
            assert not odd[i].is_contiguous() or odd[i].storage_offset() > 0
            check_op(make(backend), make("reference"), odd, F32, f"{op} argument #{i} {layout}")

    # 2. second derivatives: gradient penalties and Hessian-vector products
    @pytest.mark.parametrize("residual", [False, True])
    def test_second_derivatives_match_the_reference(self, backend, residual):
        op = self.OP
        make, args = op_inputs(op)
        if op != "phm_linear" and not residual:
            args[-1] = None
        dy = torch.randn(5, 12 if op == "phm_linear" else 16, device=DEVICE)
        v = [torch.randn_like(t) for t in args if t is not None]
        pen, hv = second_order(make(backend), args, dy, v)
        memo = {}
        pen64, hv64 = second_order(make("reference"), double_leaves(args, memo), dy.double(), [t.double() for t in v])
        for what, got, want in (("penalty", pen, pen64), ("Hv", hv, hv64)):
            for i, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-3, msg=lambda m: f"{what} #{i}: {m}")

    # 3. torch.func transforms
    def test_torch_func_grad_and_vmap_match_the_reference(self, backend):
        op = self.OP
        make, args = op_inputs(op, lead=(3, 4))
        args = [None if t is None else t.detach() for t in args]
        if op != "phm_linear":
            args[-1] = None  # no residual: x alone is transformed
        fn, rf = make(backend), make("reference")
        rest = args[1:]
        for transform in (lambda f: torch.func.grad(lambda x: f(x, *rest).square().sum()),
                          lambda f: torch.func.vmap(lambda x: f(x, *rest)),
                          lambda f: torch.func.jacrev(lambda x: f(x, *rest).sum(0))):
            torch.testing.assert_close(transform(fn)(args[0]), transform(rf)(args[0]), atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("frozen", [True, False])
    def test_forward_mode_ad_gives_every_tangent(self, backend, frozen):
        """torch.autograd.forward_ad and torch.func.jvp: y's tangent for dual x and (unless frozen)
        dual parameters, with frozen weights, and after an earlier call of the same shapes (never a
        y without its tangent)."""
        import torch.autograd.forward_ad as fwAD

        make, args = op_inputs(self.OP, lead=(3, 4))
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


class ResidualChecks:
    """For an op with a residual argument (OP: "compacter", "adapter" or "adapter_linear")."""

    OP: str

    def test_residual_grad_is_not_the_callers_dy(self, backend):
        make, args = op_inputs(self.OP)
        residual = args[-1]
        y = make(backend)(*args)
        dy = torch.randn(5, 16, device=DEVICE)
        dy_before = dy.clone()
        y.view(-1).backward(dy.view(-1))  # dy reaches the op as a view: autograd may keep it
        assert torch.equal(residual.grad, dy)
        residual.grad.add_(1.0)
        assert torch.equal(dy, dy_before), "residual.grad aliases the dy passed to backward()"


class ZeroFeatureChecks:
    """An empty feature width (d = 0) is no kernel to launch: every backend returns the
    reference's empty result and its gradients (the biases' included). OP: "adapter" or "phm_linear"."""

    OP: str

    def test_zero_features_behave_as_the_reference_on_every_backend(self, backend):
        if self.OP == "adapter":
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


def check_wide_bottleneck(backend, op, tasks):
    """A bottleneck past the fused kernels' width (`config.FUSED_MAX_KP`: no tile fits a GPU's
    shared memory or registers there) runs as separate matmuls: every backend gives the
    reference's values and gradients, and the Triton backend launches none of its adapter kernels.
    op: "compacter" or "adapter"; tasks > 1: their mixed-task forms."""
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


def check_bad_input(call, backend, change, exc, match):
    """call(backend, **change)() raises exc naming the argument (x moved to the test device)."""
    if "x" in change:
        change = {**change, "x": change["x"].to(DEVICE)}
    with pytest.raises(exc, match=match):
        call(backend, **change)()


# ---- autocast ------------------------------------------------------------------------------------------

class AutocastLayerChecks:
    """The op's layer (LAYER: "compacter", "houlsby" or "phm_linear") under autocast on each kernel
    backend against the same layer on the reference backend."""

    LAYER: str

    @pytest.mark.parametrize("x_dtype", ["float32", "low"])
    def test_autocast_behaves_like_the_reference_layers(self, kernel_backend, x_dtype):
        """fp32 parameters, autocast on: the reference layer's output dtype, every gradient in its
        tensor's dtype; the output and every gradient within twice the reference layer's own error
        against fp64 (error norms), and the gradients together at least as accurate (up to noise:
        the two round at different points). Same dy for all three."""
        backend, layer = kernel_backend, self.LAYER
        amp = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter's bf16 dot is broken
        make = {"compacter": lambda: ck.nn.CompacterAdapter(32, bottleneck=16, phm_dim=4, rank=2),
                "houlsby": lambda: ck.nn.HoulsbyAdapter(32, 16, activation="silu"),
                "phm_linear": lambda: ck.nn.PHMLinear(32, 24, phm_dim=4)}[layer]
        kernel({"houlsby": "adapter", "compacter": "compacter_adapter"}.get(layer, layer), backend)  # skips if absent
        module = make().to(DEVICE)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.4)
        x = torch.randn(7, 32, device=DEVICE, dtype=torch.float32 if x_dtype == "float32" else amp, requires_grad=True)
        params = [x, *module.parameters()]
        outs, dy = {}, None
        for name in (backend, "reference"):
            module.backend = name
            with torch.autocast(DEVICE, dtype=amp):
                y = module(x)
            dy = torch.randn(y.shape, device=DEVICE) if dy is None else dy
            outs[name] = (y, torch.autograd.grad(y, params, dy.to(y.dtype)))
        module.backend = "reference"
        p64 = [p.detach().double().requires_grad_() for p in params]
        y64 = torch.func.functional_call(module, dict(zip((n for n, _ in module.named_parameters()), p64[1:])),
                                         p64[0])
        g64 = torch.autograd.grad(y64, p64, dy.double())
        (y, g), (y_ref, g_ref) = outs[backend], outs["reference"]
        assert y.dtype == y_ref.dtype, (y.dtype, y_ref.dtype)
        errs = []

        def close(a, b, b64, what):
            err, ref_err = (a.double() - b64).norm().item(), (b.double() - b64).norm().item()
            assert err <= 2 * ref_err + 1e-6 * b64.norm().item(), \
                f"{what}: error {err:.3g} vs the reference's {ref_err:.3g}"
            errs.append((err, ref_err))

        close(y, y_ref, y64, "output")
        for i, (a, b, c, p) in enumerate(zip(g, g_ref, g64, params)):
            assert a.dtype == p.dtype, f"grad #{i}: {a.dtype}, tensor {p.dtype}"
            close(a, b, c, f"grad #{i} {tuple(a.shape)}")
        err, ref_err = (sum(e) for e in zip(*errs[1:]))
        assert err <= 1.25 * ref_err, f"gradients: total error {err:.3g} vs the reference's {ref_err:.3g}"


def _grid(*shape, bits):
    """fp32 values on a 2^-bits grid in (-1, 1): with few bits they and every sum of their
    products below are exact in fp32, so the kernels' results can be compared exactly."""
    return torch.randint(1 - 2**bits, 2**bits, shape, device=DEVICE).float() / 2**bits


def _exact_autocast_case(op, backend, wide="rule"):
    """(run, params, down, d, k): fp32 factors whose H (and, with a wide rule, whose gradients for
    x = I and a 4-bit dy) are exact in fp32. The ``wide`` factor has 12 significant bits (not
    representable in fp16 or bf16): H rounded once from fp32 differs from H summed from rounded
    factors."""
    n, d, k = 4, 32, 16
    fn = kernel(op, backend)
    bits = {"rule": (12, 1, 1), "left": (4, 12, 1), "right": (4, 1, 12)}[wide]
    down = [_grid(n, n, n, bits=bits[0]), _grid(n, d // n, 2, bits=bits[1]), _grid(n, 2, k // n, bits=bits[2])]
    if op == "phm_linear":
        params = down + [_grid(k, bits=4)]
        return lambda x: fn(x, *params), params, down, d, k
    # H_up = kron(I_n, [I 0]) copies z into y exactly: y[:, c*(d/n) + q] = z[:, c*(k/n) + q], q < k/n.
    rule_up, left_up = torch.zeros(n, n, n, device=DEVICE), torch.zeros(n, k // n, d // n, device=DEVICE)
    rule_up[0], left_up[0, :, :k // n] = torch.eye(n), torch.eye(k // n)
    params = down + [_grid(k, bits=4), rule_up, left_up, None, torch.zeros(d, device=DEVICE)]  # y = z + b_up
    res = torch.zeros(d, d, device=DEVICE)
    return lambda x: fn(x, *params, activation="identity", residual=res), params, down, d, k


class AutocastExactChecks:
    """Exact autocast checks of an op whose weights are PHM factors (OP_NAME: "phm_linear" or
    "compacter_adapter")."""

    OP_NAME: str

    @pytest.mark.parametrize("wide", ["rule", "left", "right"])
    def test_autocast_rounds_h_once_from_fp32_factors(self, kernel_backend, wide, h_build):
        """Under autocast the kernels multiply by H summed in fp32 from the fp32 factors and rounded
        once to the autocast dtype (what eager autocast does to the fp32 H it is given), never by an
        H summed from factors rounded first. Read back exactly through x = I."""
        op = self.OP_NAME
        amp = torch.bfloat16 if ON_GPU else torch.float16
        run, params, down, d, k = _exact_autocast_case(op, kernel_backend, wide)
        H = ref.phm_weight(*[t.double() for t in down])  # exact in fp32 too
        x = torch.eye(d, device=DEVICE)
        with torch.autocast(DEVICE, dtype=amp):
            y = run(x)
        if op == "phm_linear":  # y = (x @ H in amp) + b in fp32, as eager
            y, expected = y - params[3], H.to(amp)
        else:  # y = z = x @ H_down + b_down: the dot's operand H in amp, + b_down in fp32, rounded to amp
            n = down[0].shape[0]
            y = y[:, [c * (d // n) + q for c in range(n) for q in range(k // n)]]
            expected = (H.to(amp).double() + params[3]).to(amp)
        torch.testing.assert_close(y.double(), expected.double(), rtol=0, atol=0)

    @pytest.mark.parametrize("backward_in_autocast", [False, True])
    def test_autocast_parameter_gradients_are_fp32(self, kernel_backend, backward_in_autocast, h_build):
        """Under autocast every parameter gradient has its parameter's dtype (fp32) and is computed
        in fp32 from the fp32 parameters, also when backward runs inside the autocast region: here,
        where fp32 arithmetic is exact, it equals the fp64 gradient exactly (a gradient rounded
        through fp16/bf16, or computed from rounded factors, does not). Checked for the whole PHM
        linear and the adapter's down projection and biases."""
        op = self.OP_NAME
        amp = torch.bfloat16 if ON_GPU else torch.float16
        run, params, down, d, k = _exact_autocast_case(op, kernel_backend)
        leaves = [p.requires_grad_() for p in params if p is not None]
        x = torch.eye(d, device=DEVICE)
        with torch.autocast(DEVICE, dtype=amp):
            y = run(x)
            dy = _grid(*y.shape, bits=4).to(y.dtype)
            with torch.autocast(DEVICE, dtype=amp, enabled=backward_in_autocast):
                grads = torch.autograd.grad(y, leaves, dy)
        p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
        fn64 = ref.phm_linear if op == "phm_linear" else ref.compacter_adapter
        kw = {} if op == "phm_linear" else dict(activation="identity", residual=torch.zeros(d, d, dtype=torch.float64,
                                                                                             device=DEVICE))
        y64 = fn64(x.double(), *p64, **kw)
        g64 = torch.autograd.grad(y64, [p for p in p64 if p is not None], dy.double())
        exact = {0, 1, 2, 3, 6}  # leaves: the down projection's factors and bias, [rule_up, left_up, b_up]
        for i, (g, e, p) in enumerate(zip(grads, g64, leaves)):
            assert g.dtype == p.dtype, f"grad #{i}: {g.dtype}, parameter {p.dtype}"
            if i in exact:
                torch.testing.assert_close(g.double(), e, rtol=0, atol=0, msg=lambda m: f"grad #{i}: {m}")
