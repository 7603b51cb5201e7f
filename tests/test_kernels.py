"""Every kernel backend against the reference: outputs and every gradient, one standard for all.

Runs the Triton kernels in the CPU interpreter when there is no GPU (conftest sets
TRITON_INTERPRET=1), so sizes are kept small; the same tests run on a GPU as they are.
"""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import reference as ref
from compacter_kernels.ops.triton import config, launch
from utils import (ON_GPU, assert_matches_reference, check_op, compacter_inputs, dense_inputs, phm_factors,
                   why_backend_cannot_run)

DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    why = why_backend_cannot_run(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel fails to write fails the test."""
    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture(params=["in_kernel", "prebuilt"])
def h_build(request, monkeypatch, backend):
    """Both ways the Triton kernels get H: tiles built in registers, or H built once per call."""
    if backend != "triton" and request.param == "in_kernel":
        pytest.skip(f"only the triton backend builds H inside its kernels; {backend} runs once, as prebuilt")
    monkeypatch.setattr(config, "INKERNEL_H_BUDGET", 10**9 if request.param == "in_kernel" else 0)


def _skip_unsupported(dtype, backend):
    if dtype == torch.bfloat16 and not ON_GPU and backend == "triton":
        pytest.skip("bf16 tl.dot is silently wrong in the Triton interpreter: bf16 is tested on a GPU")


def _kernel(op, backend):
    return lambda *a, **kw: getattr(ck, op)(*a, backend=backend, **kw)


# ---- the fused Compacter adapter ----------------------------------------------------------------

SHAPES = [  # (d, k, n, rank): k not a multiple of 16, n in {2, 4, 8}, ranks 1 and 4, unfactorised
    (48, 24, 4, 1), (64, 24, 8, 4), (32, 48, 2, 1), (40, 20, 4, None), (64, 16, 2, 4),
]


@pytest.mark.parametrize("d,k,n,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compacter_adapter_matches_reference(backend, d, k, n, rank, dtype, h_build):
    _skip_unsupported(dtype, backend)
    inp = compacter_inputs(lead=(2, 19), d=d, k=k, n=n, rank=rank, dtype=dtype, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), dtype,
             f"compacter d={d} k={k} n={n} r={rank}", activation="gelu", scale=0.7)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_inference_without_autograd(backend, grad_mode):
    """Serving: under no_grad / inference_mode, parameters that require grad, no graph built."""
    inp = compacter_inputs(lead=(2, 13), d=32, k=24, n=4, rank=1, dtype=torch.float32, device=DEVICE)
    with grad_mode():
        y = _kernel("compacter_adapter", backend)(*inp.args(), activation="gelu", scale=0.5)
        expected = ref.compacter_adapter(*inp.args(), activation="gelu", scale=0.5)
    assert not y.requires_grad and y.grad_fn is None
    assert_matches_reference(y, expected.double(), expected, torch.float32, "no-grad output")


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_every_activation(backend, activation):
    inp = compacter_inputs(lead=(21,), d=32, k=24, n=4, rank=1, dtype=torch.float32, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), torch.float32,
             activation, activation=activation, scale=1.3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared_rule", [True, False])
def test_bias_and_rule_sharing(backend, bias, shared_rule):
    inp = compacter_inputs(lead=(17,), d=32, k=16, n=4, rank=2, bias=bias, shared_rule=shared_rule,
                           dtype=torch.float32, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), torch.float32,
             f"bias={bias} shared={shared_rule}", activation="silu")


def test_separate_residual(backend):
    inp = compacter_inputs(lead=(3, 5), d=32, k=24, n=4, dtype=torch.float32, device=DEVICE)
    residual = torch.randn_like(inp.x, requires_grad=True)
    args = inp.args() + (residual,)

    def kernel(*a, **kw):
        return ck.compacter_adapter(*a[:9], residual=a[9], backend=backend, **kw)

    def reference(*a, **kw):
        return ref.compacter_adapter(*a[:9], residual=a[9], **kw)

    check_op(kernel, reference, args, torch.float32, "residual", activation="gelu_tanh", scale=0.5)


def test_noncontiguous_and_broadcast_x(backend):
    inp = compacter_inputs(lead=(9,), d=32, k=16, n=4, dtype=torch.float32, device=DEVICE, requires_grad=False)
    wide = torch.randn(9, 64, device=DEVICE)
    for x in (wide[:, ::2], wide[:, :32], torch.randn(1, 32, device=DEVICE).expand(9, 32),
              torch.randn(32, 9, device=DEVICE).t()):
        y = ck.compacter_adapter(x, *inp.args()[1:], backend=backend)
        torch.testing.assert_close(y, ref.compacter_adapter(x.contiguous(), *inp.args()[1:]), atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("M", [0, 1])
def test_tiny_and_empty_batches(backend, M):
    inp = compacter_inputs(lead=(M,), d=32, k=24, n=4, dtype=torch.float32, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), torch.float32, f"M={M}")
    y = ck.compacter_adapter(*inp.args(), backend=backend)
    assert y.shape == (M, 32)
    if M == 0:
        y.sum().backward()
        assert inp.left_down.grad is not None and torch.all(inp.left_down.grad == 0)


def test_gradients_are_deterministic(backend):
    inp = compacter_inputs(lead=(67,), d=48, k=24, n=4, dtype=torch.float32, device=DEVICE)
    dy = torch.randn(67, 48, device=DEVICE)
    runs = []
    for _ in range(2):
        y = ck.compacter_adapter(*inp.args(), backend=backend)
        runs.append(torch.autograd.grad(y, inp.tensors(), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the dense Houlsby adapter and PHM linear through the same kernels --------------------------

@pytest.mark.parametrize("d,k", [(48, 24), (32, 20), (64, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_adapter_matches_reference(backend, d, k, dtype):
    _skip_unsupported(dtype, backend)
    args = dense_inputs(lead=(3, 7), d=d, k=k, dtype=dtype, device=DEVICE)
    check_op(_kernel("adapter", backend), ref.adapter, args, dtype, f"houlsby d={d} k={k}", activation="relu",
             scale=2.0)


# Sizes that take each path of the kernels (the CUDA kernels' in brackets): rows of x kept on
# chip or streamed over d in chunks [32 rows x d x 2 B vs 64 KiB], k > 128 [16-row blocks],
# k > 256 [two passes over d], d not a multiple of 8 [scalar loads], x with an odd row stride.
PATH_SHAPES = [  # (M, d, k, dtype)
    (33, 768, 24, torch.float16), (17, 1100, 24, torch.float16), (37, 100, 192, torch.float32),
    (19, 72, 300, torch.float32), (45, 36, 20, torch.bfloat16),
]


@pytest.mark.parametrize("M,d,k,dtype", PATH_SHAPES)
def test_kernel_paths(backend, M, d, k, dtype):
    _skip_unsupported(dtype, backend)
    x, *params = dense_inputs(lead=(M,), d=d + 3, k=k, dtype=dtype, device=DEVICE)
    # x (M, d) with row stride d + 3; the weights cut to d.
    x = x.detach()[:, :d].requires_grad_()
    wd, bd, wu, bu = params
    wd, wu, bu = (t.detach()[sl].contiguous().requires_grad_() for t, sl in
                  ((wd, slice(0, d)), (wu, (slice(None), slice(0, d))), (bu, slice(0, d))))
    check_op(_kernel("adapter", backend), ref.adapter, (x, wd, bd, wu, bu), dtype, f"paths M={M} d={d} k={k}",
             activation="gelu", scale=0.5)


@pytest.mark.parametrize("n,I,O,rank", [(4, 48, 24, 1), (2, 20, 36, 4), (4, 16, 40, None), (8, 64, 48, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_phm_linear_matches_reference(backend, n, I, O, rank, dtype, bias, h_build):
    _skip_unsupported(dtype, backend)
    rule, left, right = phm_factors(n, I, O, rank, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(O, dtype=dtype, device=DEVICE, requires_grad=True) if bias else None
    x = torch.randn(3, 11, I, dtype=dtype, device=DEVICE, requires_grad=True)
    check_op(_kernel("phm_linear", backend), ref.phm_linear, (x, rule, left, right, b), dtype,
             f"phm_linear n={n} {I}->{O} r={rank}")


# ---- composition with PyTorch ---------------------------------------------------------------------

def test_opcheck_triton_ops():
    """The custom ops under the Functions (their schemas, fake impls, no aliasing): single-task,
    dense with a residual, mixed-task, the backward, and phm_linear's two. Their autograd is the
    Functions' (tested everywhere else), so the inputs here need no gradient."""
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    from compacter_kernels.ops.triton import adapter as triton_adapter

    inp = compacter_inputs(lead=(5,), d=32, k=16, n=4, dtype=torch.float32, device=DEVICE, requires_grad=False)
    params = inp.args()[1:]
    fwd = torch.ops.compacter_kernels.triton_adapter_fwd.default
    torch.library.opcheck(fwd, (inp.x, None, *params, None, "gelu", 0.5, torch.float32, True))
    x, wd, bd, wu, bu = dense_inputs(lead=(5,), d=32, k=16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    torch.library.opcheck(fwd, (x, torch.randn_like(x), None, wd, None, bd, None, wu, None, bu, None, "relu", 1.0,
                                torch.float32, False))
    ids = torch.tensor([1, 0, 1, 1, 0], device=DEVICE)
    stacked = (None, torch.stack([wd, wd.flip(0)]), None, torch.stack([bd, bd]), None, torch.stack([wu, wu]), None,
               torch.stack([bu, bu]))
    torch.library.opcheck(fwd, (x, None, *stacked, ids, "silu", 1.0, torch.float32, True))
    y, z, hd, hu, order, counts = triton_adapter.adapter_fwd(inp.x, None, *params, None, "gelu", 0.5, torch.float32,
                                                             True)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_adapter_bwd.default,
                          (torch.randn_like(y), inp.x, z, hd, hu, order, counts, *params, "gelu", 0.5, False,
                           params[0] is params[4], False))
    rule, left, right = phm_factors(4, 16, 24, 2, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_phm_linear_fwd.default,
                          (x[:, :16], rule, left, right, None))
    torch.library.opcheck(torch.ops.compacter_kernels.triton_phm_linear_bwd.default,
                          (torch.randn(5, 24, device=DEVICE), x[:, :16], rule, left, right, None))


def test_torch_compile_fullgraph_of_a_module():
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    model = torch.nn.Sequential(
        ck.nn.CompacterAdapter(32, bottleneck=16, phm_dim=4, backend="triton"),
        ck.nn.PHMLinear(32, 16, phm_dim=4, backend="triton"),
    ).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    y_eager = model(x)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    g = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *model.parameters()])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("x_dtype", ["float32", "low"])
@pytest.mark.parametrize("layer", ["compacter", "houlsby", "phm_linear"])
def test_autocast_behaves_like_the_reference_layers(backend, x_dtype, layer):
    """fp32 parameters, autocast on: the reference layer's output dtype, every gradient in its
    tensor's dtype; the output and every gradient within twice the reference layer's own error
    against fp64 (error norms), and the gradients together at least as accurate (up to noise:
    the two round at different points). Same dy for all three."""
    amp = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter's bf16 dot is broken
    make = {"compacter": lambda: ck.nn.CompacterAdapter(32, bottleneck=16, phm_dim=4, rank=2),
            "houlsby": lambda: ck.nn.HoulsbyAdapter(32, 16, activation="silu"),
            "phm_linear": lambda: ck.nn.PHMLinear(32, 24, phm_dim=4)}[layer]
    _kernel({"houlsby": "adapter", "compacter": "compacter_adapter"}.get(layer, layer), backend)  # skips if absent
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
    y64 = torch.func.functional_call(module, dict(zip((n for n, _ in module.named_parameters()), p64[1:])), p64[0])
    g64 = torch.autograd.grad(y64, p64, dy.double())
    (y, g), (y_ref, g_ref) = outs[backend], outs["reference"]
    assert y.dtype == y_ref.dtype, (y.dtype, y_ref.dtype)
    errs = []

    def close(a, b, b64, what):
        err, ref_err = (a.double() - b64).norm().item(), (b.double() - b64).norm().item()
        assert err <= 2 * ref_err + 1e-6 * b64.norm().item(), f"{what}: error {err:.3g} vs the reference's {ref_err:.3g}"
        errs.append((err, ref_err))

    close(y, y_ref, y64, "output")
    for i, (a, b, c, p) in enumerate(zip(g, g_ref, g64, params)):
        assert a.dtype == p.dtype, f"grad #{i}: {a.dtype}, tensor {p.dtype}"
        close(a, b, c, f"grad #{i} {tuple(a.shape)}")
    err, ref_err = (sum(e) for e in zip(*errs[1:]))
    assert err <= 1.25 * ref_err, f"gradients: total error {err:.3g} vs the reference's {ref_err:.3g}"


FULL_GRID = [(d, k, n, r) for d in (512, 768, 1024, 4096) for k in (24, 48, 96, 192, 256)
             for n in (2, 4, 8) for r in (1, 4) if k % n == 0 and (d, n) != (4096, 2)]


@pytest.mark.skipif(not ON_GPU, reason="the full size grid runs on a GPU; the interpreter runs the trimmed grid")
@pytest.mark.parametrize("d,k,n,rank", FULL_GRID)
def test_full_grid_bf16_on_gpu(backend, d, k, n, rank):
    inp = compacter_inputs(lead=(4, 333), d=d, k=k, n=n, rank=rank, dtype=torch.bfloat16, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), torch.bfloat16,
             f"bf16 d={d} k={k} n={n} r={rank}", activation="gelu_tanh", scale=0.5)


# ---- autocast: fp32 parameters stay fp32 (H summed in fp32 and rounded once, fp32 gradients) ------

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
    fn = _kernel(op, backend)
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


@pytest.mark.parametrize("wide", ["rule", "left", "right"])
@pytest.mark.parametrize("op", ["phm_linear", "compacter_adapter"])
def test_autocast_rounds_h_once_from_fp32_factors(backend, op, wide, h_build):
    """Under autocast the kernels multiply by H summed in fp32 from the fp32 factors and rounded
    once to the autocast dtype (what eager autocast does to the fp32 H it is given), never by an
    H summed from factors rounded first. Read back exactly through x = I."""
    amp = torch.bfloat16 if ON_GPU else torch.float16
    run, params, down, d, k = _exact_autocast_case(op, backend, wide)
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
@pytest.mark.parametrize("op", ["phm_linear", "compacter_adapter"])
def test_autocast_parameter_gradients_are_fp32(backend, op, backward_in_autocast, h_build):
    """Under autocast every parameter gradient has its parameter's dtype (fp32) and is computed
    in fp32 from the fp32 parameters, also when backward runs inside the autocast region: here,
    where fp32 arithmetic is exact, it equals the fp64 gradient exactly (a gradient rounded
    through fp16/bf16, or computed from rounded factors, does not). Checked for the whole PHM
    linear and the adapter's down projection and biases."""
    amp = torch.bfloat16 if ON_GPU else torch.float16
    run, params, down, d, k = _exact_autocast_case(op, backend)
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


# ---- factor_grads on rows of B_i wider than its column chunk ---------------------------------------

@pytest.fixture
def narrow_column_chunks(monkeypatch):
    """factor_grads in chunks of 8 columns (config.GRADS_MAX_COLS; 4096 on a GPU, where only
    phm_linear d -> 4d at d >= 4096 with n <= 4 has wider rows): d left summed over the chunks."""
    from compacter_kernels.ops.triton import grads
    cached = (config.grads_tile, grads._projection_plan, grads.factor_grads_plan)
    monkeypatch.setattr(config, "GRADS_MAX_COLS", 8)
    for f in cached:
        f.cache_clear()
    yield
    for f in cached:
        f.cache_clear()


@pytest.mark.parametrize("n,I,O,rank", [(2, 20, 36, 4), (4, 16, 72, 1), (2, 12, 40, None)])
def test_phm_linear_gradients_in_column_chunks(narrow_column_chunks, n, I, O, rank):
    if why_backend_cannot_run("triton") is not None:
        pytest.skip(why_backend_cannot_run("triton"))
    rule, left, right = phm_factors(n, I, O, rank, dtype=torch.float32, device=DEVICE, requires_grad=True)
    b = torch.randn(O, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 11, I, device=DEVICE, requires_grad=True)
    check_op(_kernel("phm_linear", "triton"), ref.phm_linear, (x, rule, left, right, b), torch.float32,
             f"phm_linear in column chunks n={n} {I}->{O} r={rank}")


@pytest.mark.parametrize("shared_rule", [True, False])
def test_compacter_gradients_in_column_chunks(narrow_column_chunks, shared_rule):
    if why_backend_cannot_run("triton") is not None:
        pytest.skip(why_backend_cannot_run("triton"))
    inp = compacter_inputs(lead=(3, 7), d=48, k=40, n=2, rank=4, dtype=torch.float32, device=DEVICE,
                           shared_rule=shared_rule)
    check_op(_kernel("compacter_adapter", "triton"), ref.compacter_adapter, inp.args(), torch.float32,
             f"compacter in column chunks shared_rule={shared_rule}")


def test_dense_adapter_gradients_in_column_chunks(narrow_column_chunks):
    if why_backend_cannot_run("triton") is not None:
        pytest.skip(why_backend_cannot_run("triton"))
    args = dense_inputs(lead=(3, 7), d=48, k=20, dtype=torch.float32, device=DEVICE)
    check_op(_kernel("adapter", "triton"), ref.adapter, args, torch.float32, "houlsby in column chunks",
             activation="relu")
