"""Every kernel backend against the reference: outputs and every gradient, one standard for all.

Runs the Triton kernels in the CPU interpreter when there is no GPU (conftest sets
TRITON_INTERPRET=1), so sizes are kept small; the same tests run on a GPU as they are.
"""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import reference as ref
from compacter_kernels.ops import _triton_common
from utils import TOLERANCES, compacter_inputs, dense_inputs, phm_factors

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    status = ck.available_backends()[request.param]
    if not status:
        pytest.skip(f"backend {request.param!r} unavailable here: {status.reason}")
    if request.param == "cuda" and not ON_GPU:
        pytest.skip("the cuda backend needs a GPU")
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel fails to write fails the test."""
    monkeypatch.setattr(_triton_common, "POISON", True)


@pytest.fixture(params=["in_kernel", "prebuilt"])
def h_build(request, monkeypatch):
    """Both ways the Triton kernels get H: tiles built in registers, or H built once per call."""
    monkeypatch.setattr(_triton_common, "INKERNEL_H_BUDGET", 10**9 if request.param == "in_kernel" else 0)


def _skip_unsupported(dtype):
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bf16 tl.dot is silently wrong in the Triton interpreter: bf16 is tested on a GPU")


def _double(tensors, memo):
    """fp64 leaf copies of the given tensors for the reference; memo keeps sharing (one copy each)."""
    for t in tensors:
        if t is not None and id(t) not in memo:
            memo[id(t)] = t.detach().double().requires_grad_(t.requires_grad)
    return [None if t is None else memo[id(t)] for t in tensors]


def assert_matches_reference(actual, expected64, expected_lowp, dtype, what):
    """fp32: per-dtype tolerances. fp16/bf16: error vs fp64 at most twice PyTorch's own error
    in that dtype (flash-attention's rule) plus the dtype's atol."""
    assert actual.dtype == dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    err = (actual.double() - expected64).abs().max().item()
    ref_err = (expected_lowp.double() - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    assert err <= 2 * ref_err + atol * max(1.0, scale), f"{what}: error {err:.3g} vs PyTorch's {ref_err:.3g}"


def check_op(fn_kernel, fn_ref, args, dtype, what, **kw):
    """Output and every gradient of fn_kernel(args) against fn_ref in fp64 and in dtype."""
    out = fn_kernel(*args, **kw)
    memo = {}
    a64 = _double(args, memo)
    out64 = fn_ref(*a64, **kw)
    out_lp = fn_ref(*args, **kw)
    assert out.shape == out64.shape, what
    assert_matches_reference(out, out64, out_lp, dtype, f"{what} output")
    leaves = list({id(t): t for t in args if t is not None and t.requires_grad}.values())
    if not leaves or out.numel() == 0:
        return
    dy = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dy)
    g64 = torch.autograd.grad(out64, _double(leaves, memo), dy.double())
    g_lp = torch.autograd.grad(out_lp, leaves, dy)
    for i, (a, b, c) in enumerate(zip(g, g64, g_lp)):
        assert_matches_reference(a, b, c, dtype, f"{what} grad #{i} {tuple(a.shape)}")


def _kernel(op, backend):
    from compacter_kernels.backends import IMPLEMENTATIONS

    if op not in IMPLEMENTATIONS[backend]:
        pytest.skip(f"backend {backend!r} has no {op} kernel")
    return lambda *a, **kw: getattr(ck, op)(*a, backend=backend, **kw)


# ---- the fused Compacter adapter ----------------------------------------------------------------

SHAPES = [  # (d, k, n, rank): k not a multiple of 16, n in {2, 4, 8}, ranks 1 and 4, unfactorised
    (48, 24, 4, 1), (64, 24, 8, 4), (32, 48, 2, 1), (40, 20, 4, None), (64, 16, 2, 4),
]


@pytest.mark.parametrize("d,k,n,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compacter_adapter_matches_reference(backend, d, k, n, rank, dtype, h_build):
    _skip_unsupported(dtype)
    inp = compacter_inputs(lead=(2, 19), d=d, k=k, n=n, rank=rank, dtype=dtype, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), dtype,
             f"compacter d={d} k={k} n={n} r={rank}", activation="gelu", scale=0.7)


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
    _skip_unsupported(dtype)
    args = dense_inputs(lead=(3, 7), d=d, k=k, dtype=dtype, device=DEVICE)
    check_op(_kernel("adapter", backend), ref.adapter, args, dtype, f"houlsby d={d} k={k}", activation="relu",
             scale=2.0)


@pytest.mark.parametrize("n,I,O,rank", [(4, 48, 24, 1), (2, 20, 36, 4), (4, 16, 40, None), (8, 64, 48, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_phm_linear_matches_reference(backend, n, I, O, rank, dtype, bias, h_build):
    _skip_unsupported(dtype)
    rule, left, right = phm_factors(n, I, O, rank, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(O, dtype=dtype, device=DEVICE, requires_grad=True) if bias else None
    x = torch.randn(3, 11, I, dtype=dtype, device=DEVICE, requires_grad=True)
    check_op(_kernel("phm_linear", backend), ref.phm_linear, (x, rule, left, right, b), dtype,
             f"phm_linear n={n} {I}->{O} r={rank}")


# ---- composition with PyTorch ---------------------------------------------------------------------

def test_opcheck_triton_ops():
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    inp = compacter_inputs(lead=(5,), d=32, k=16, n=4, dtype=torch.float32, device=DEVICE)
    x2 = inp.x.detach().requires_grad_()
    args = (x2, None, *inp.args()[1:], "gelu", 0.5, torch.float32)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_adapter_fwd.default, args)
    x, wd, bd, wu, bu = dense_inputs(lead=(5,), d=32, k=16, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_adapter_fwd.default,
                          (x, torch.randn_like(x), None, wd, None, bd, None, wu, None, bu, "relu", 1.0, torch.float32))
    rule, left, right = phm_factors(4, 16, 24, 2, dtype=torch.float32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_phm_linear_fwd.default,
                          (x[:, :16].detach().requires_grad_(), rule, left, right, None))


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
    """fp32 parameters, autocast on: same output dtype as the reference layer, values and
    gradients within twice the reference's own error against fp64."""
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
    outs = {}
    for name in (backend, "reference"):
        module.backend = name
        with torch.autocast(DEVICE, dtype=amp):
            y = module(x)
        outs[name] = (y, torch.autograd.grad(y.float().square().sum(), params))
    module.backend = "reference"
    y64 = module.double()(x.detach().double())
    g64 = torch.autograd.grad(y64.square().sum(), [p for p in module.parameters()])
    (y, g), (y_ref, g_ref) = outs[backend], outs["reference"]
    assert y.dtype == y_ref.dtype, (y.dtype, y_ref.dtype)

    def close(a, b, b64, what):
        err, ref_err = (a.double() - b64).abs().max().item(), (b.double() - b64).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * max(1.0, b64.abs().max().item()), f"{what}: {err:.3g} vs {ref_err:.3g}"

    close(y, y_ref, y64, "output")
    for i, (a, b, c) in enumerate(zip(g[1:], g_ref[1:], g64)):
        close(a, b, c, f"grad of parameter {i}")


FULL_GRID = [(d, k, n, r) for d in (512, 768, 1024, 4096) for k in (24, 48, 96, 192, 256)
             for n in (2, 4, 8) for r in (1, 4) if k % n == 0 and (d, n) != (4096, 2)]


@pytest.mark.skipif(not ON_GPU, reason="the full size grid runs on a GPU; the interpreter runs the trimmed grid")
@pytest.mark.parametrize("d,k,n,rank", FULL_GRID)
def test_full_grid_bf16_on_gpu(backend, d, k, n, rank):
    inp = compacter_inputs(lead=(4, 333), d=d, k=k, n=n, rank=rank, dtype=torch.bfloat16, device=DEVICE)
    check_op(_kernel("compacter_adapter", backend), ref.compacter_adapter, inp.args(), torch.bfloat16,
             f"bf16 d={d} k={k} n={n} r={rank}", activation="gelu_tanh", scale=0.5)
