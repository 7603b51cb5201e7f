"""ck.compacter_adapter (the fused Compacter adapter) on every backend: outputs and every gradient
against the reference over shapes, dtypes, activations, biases and rule sharing; the generic op
checks (tests/op_checks.py: odd layouts, second derivatives, torch.func, forward-mode AD, the
residual's gradient, autocast); random valid and invalid configurations, NaN/inf, fp16 overflow;
bad input named; the reference against itself (two formulations, gradcheck in float64).

Runs the Triton kernels in the CPU interpreter when there is no GPU (conftest sets
TRITON_INTERPRET=1), so sizes are kept small; the same tests run on a GPU as they are.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compacter_kernels as ck
import op_checks
from compacter_kernels import reference as ref
from op_checks import (DEVICE, DTYPES, F32, backend, h_build, kernel, kernel_backend, narrow_column_chunks,  # noqa: F401
                       poison_outputs, reference_only, skip_unsupported, usable_backends)
from utils import (ON_GPU, assert_matches_reference, check_op, compacter_inputs, double_leaves, kron_loop,
                   phm_factors)

# Bounded for CI; `HYPOTHESIS_PROFILE=gpu` explores more on a GPU machine.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- every kernel backend against the reference --------------------------------------------------

SHAPES = [  # (d, k, n, rank): k not a multiple of 16, n in {2, 4, 8}, ranks 1 and 4, unfactorised
    (48, 24, 4, 1), (64, 24, 8, 4), (32, 48, 2, 1), (40, 20, 4, None), (64, 16, 2, 4),
]


@pytest.mark.parametrize("d,k,n,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compacter_adapter_matches_reference(kernel_backend, d, k, n, rank, dtype, h_build):
    skip_unsupported(dtype, kernel_backend)
    inp = compacter_inputs(lead=(2, 19), d=d, k=k, n=n, rank=rank, dtype=dtype, device=DEVICE)
    check_op(kernel("compacter_adapter", kernel_backend), ref.compacter_adapter, inp.args(), dtype,
             f"compacter d={d} k={k} n={n} r={rank}", activation="gelu", scale=0.7)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_inference_without_autograd(kernel_backend, grad_mode):
    """Serving: under no_grad / inference_mode, parameters that require grad, no graph built."""
    inp = compacter_inputs(lead=(2, 13), d=32, k=24, n=4, rank=1, dtype=torch.float32, device=DEVICE)
    with grad_mode():
        y = kernel("compacter_adapter", kernel_backend)(*inp.args(), activation="gelu", scale=0.5)
        expected = ref.compacter_adapter(*inp.args(), activation="gelu", scale=0.5)
    assert not y.requires_grad and y.grad_fn is None
    assert_matches_reference(y, expected.double(), expected, torch.float32, "no-grad output")


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_every_activation(kernel_backend, activation):
    inp = compacter_inputs(lead=(21,), d=32, k=24, n=4, rank=1, dtype=torch.float32, device=DEVICE)
    check_op(kernel("compacter_adapter", kernel_backend), ref.compacter_adapter, inp.args(), torch.float32,
             activation, activation=activation, scale=1.3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared_rule", [True, False])
def test_bias_and_rule_sharing(kernel_backend, bias, shared_rule):
    inp = compacter_inputs(lead=(17,), d=32, k=16, n=4, rank=2, bias=bias, shared_rule=shared_rule,
                           dtype=torch.float32, device=DEVICE)
    check_op(kernel("compacter_adapter", kernel_backend), ref.compacter_adapter, inp.args(), torch.float32,
             f"bias={bias} shared={shared_rule}", activation="silu")


def test_separate_residual(kernel_backend):
    inp = compacter_inputs(lead=(3, 5), d=32, k=24, n=4, dtype=torch.float32, device=DEVICE)
    residual = torch.randn_like(inp.x, requires_grad=True)
    args = inp.args() + (residual,)

    def run(*a, **kw):
        return ck.compacter_adapter(*a[:9], residual=a[9], backend=kernel_backend, **kw)

    def reference(*a, **kw):
        return ref.compacter_adapter(*a[:9], residual=a[9], **kw)

    check_op(run, reference, args, torch.float32, "residual", activation="gelu_tanh", scale=0.5)


def test_noncontiguous_and_broadcast_x(kernel_backend):
    inp = compacter_inputs(lead=(9,), d=32, k=16, n=4, dtype=torch.float32, device=DEVICE, requires_grad=False)
    wide = torch.randn(9, 64, device=DEVICE)
    for x in (wide[:, ::2], wide[:, :32], torch.randn(1, 32, device=DEVICE).expand(9, 32),
              torch.randn(32, 9, device=DEVICE).t()):
        y = ck.compacter_adapter(x, *inp.args()[1:], backend=kernel_backend)
        torch.testing.assert_close(y, ref.compacter_adapter(x.contiguous(), *inp.args()[1:]), atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("M", [0, 1])
def test_tiny_and_empty_batches(kernel_backend, M):
    inp = compacter_inputs(lead=(M,), d=32, k=24, n=4, dtype=torch.float32, device=DEVICE)
    check_op(kernel("compacter_adapter", kernel_backend), ref.compacter_adapter, inp.args(), torch.float32, f"M={M}")
    y = ck.compacter_adapter(*inp.args(), backend=kernel_backend)
    assert y.shape == (M, 32)
    if M == 0:
        y.sum().backward()
        assert inp.left_down.grad is not None and torch.all(inp.left_down.grad == 0)


def test_gradients_are_deterministic(kernel_backend):
    inp = compacter_inputs(lead=(67,), d=48, k=24, n=4, dtype=torch.float32, device=DEVICE)
    dy = torch.randn(67, 48, device=DEVICE)
    runs = []
    for _ in range(2):
        y = ck.compacter_adapter(*inp.args(), backend=kernel_backend)
        runs.append(torch.autograd.grad(y, inp.tensors(), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


FULL_GRID = [(d, k, n, r) for d in (512, 768, 1024, 4096) for k in (24, 48, 96, 192, 256)
             for n in (2, 4, 8) for r in (1, 4) if k % n == 0 and (d, n) != (4096, 2)]


@pytest.mark.skipif(not ON_GPU, reason="the full size grid runs on a GPU; the interpreter runs the trimmed grid")
@pytest.mark.parametrize("d,k,n,rank", FULL_GRID)
def test_full_grid_bf16_on_gpu(kernel_backend, d, k, n, rank):
    inp = compacter_inputs(lead=(4, 333), d=d, k=k, n=n, rank=rank, dtype=torch.bfloat16, device=DEVICE)
    check_op(kernel("compacter_adapter", kernel_backend), ref.compacter_adapter, inp.args(), torch.bfloat16,
             f"bf16 d={d} k={k} n={n} r={rank}", activation="gelu_tanh", scale=0.5)



@pytest.mark.parametrize("shared_rule", [True, False])
def test_compacter_gradients_in_column_chunks(narrow_column_chunks, shared_rule):
    inp = compacter_inputs(lead=(3, 7), d=48, k=40, n=2, rank=4, dtype=torch.float32, device=DEVICE,
                           shared_rule=shared_rule)
    check_op(kernel("compacter_adapter", "triton"), ref.compacter_adapter, inp.args(), torch.float32,
             f"compacter in column chunks shared_rule={shared_rule}")

def test_opcheck_triton_ops():
    """The triton custom ops under the Function (their schemas, fake impls, no aliasing): the
    forward and the backward of the single-task adapter. Their autograd is the Function's
    (tested everywhere else), so the inputs here need no gradient."""
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    from compacter_kernels.ops.triton import adapter as triton_adapter

    inp = compacter_inputs(lead=(5,), d=32, k=16, n=4, dtype=torch.float32, device=DEVICE, requires_grad=False)
    params = inp.args()[1:]
    fwd = torch.ops.compacter_kernels.triton_adapter_fwd.default
    torch.library.opcheck(fwd, (inp.x, None, *params, None, "gelu", 0.5, torch.float32, True))
    y, z, hd, hu, order, counts = triton_adapter.adapter_fwd(inp.x, None, *params, None, "gelu", 0.5, torch.float32,
                                                             True)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_adapter_bwd.default,
                          (torch.randn_like(y), inp.x, z, hd, hu, order, counts, *params, "gelu", 0.5, False,
                           params[0] is params[4], False))


# ---- the generic op checks (tests/op_checks.py) ---------------------------------------------------

class TestOpChecks(op_checks.OpChecks, op_checks.ResidualChecks):
    OP = "compacter"


class TestAutocast(op_checks.AutocastLayerChecks, op_checks.AutocastExactChecks):
    LAYER = "compacter"
    OP_NAME = "compacter_adapter"


def test_second_derivatives_with_a_shared_rule(backend):
    inp = compacter_inputs(lead=(5,), d=16, k=8, n=4, rank=1, dtype=F32, device=DEVICE, shared_rule=True)
    dy = torch.randn(5, 16, device=DEVICE)
    v = [torch.randn_like(t) for t in inp.args() if t is not None]
    got = op_checks.second_order(op_checks.compacter(backend), list(inp.args()), dy, v)
    memo = {}
    want = op_checks.second_order(op_checks.compacter("reference"), double_leaves(inp.args(), memo), dy.double(),
                                  [t.double() for t in v])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-3)


def test_a_bottleneck_wider_than_the_kernels_runs_as_matmuls(backend):
    op_checks.check_wide_bottleneck(backend, "compacter", tasks=1)


# ---- random valid and invalid configurations, NaN/inf, overflow -------------------------------------

@st.composite
def adapter_configs(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    return dict(
        n=n,
        d=n * draw(st.integers(1, 6)),
        k=n * draw(st.integers(1, 4)),
        rank=draw(st.sampled_from([None, 1, 2, 4])),
        lead=tuple(draw(st.lists(st.integers(0, 5), max_size=2))),
        activation=draw(st.sampled_from(ref.ACTIVATIONS)),
        bias=draw(st.booleans()),
        shared=draw(st.booleans()),
        residual=draw(st.booleans()),
        scale=draw(st.floats(-2, 2, allow_nan=False)),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
    )


def _build(cfg, dtype, device):
    x = torch.randn(*cfg["lead"], cfg["d"], dtype=dtype, device=device)
    down = phm_factors(cfg["n"], cfg["d"], cfg["k"], cfg["rank"], dtype=dtype, device=device)
    up = phm_factors(cfg["n"], cfg["k"], cfg["d"], cfg["rank"], dtype=dtype, device=device)
    if cfg["shared"]:
        up[0] = down[0]
    bd = torch.randn(cfg["k"], dtype=dtype, device=device) if cfg["bias"] else None
    bu = torch.randn(cfg["d"], dtype=dtype, device=device) if cfg["bias"] else None
    residual = torch.randn_like(x) if cfg["residual"] else None
    return [x, *down, bd, *up, bu], residual


@given(cfg=adapter_configs())
def test_random_valid_configurations_match_the_reference_on_every_backend(cfg):
    """Output and every gradient against the fp64 reference; in fp16/bf16 within twice the error
    of the reference run in that dtype (tests/utils.py::assert_matches_reference)."""
    dtype = cfg["dtype"]
    args, residual = _build(cfg, dtype, DEVICE)
    leaves = list({id(t): t.requires_grad_() for t in args + [residual] if t is not None}.values())
    kw = dict(activation=cfg["activation"], scale=cfg["scale"], residual=residual)
    memo = {}
    args64 = double_leaves(args, memo)
    (res64,) = double_leaves([residual], memo)
    y64 = ref.compacter_adapter(*args64, **{**kw, "residual": res64})
    y_lp = ref.compacter_adapter(*args, **kw)
    dy = torch.randn(y64.shape, dtype=dtype, device=DEVICE)
    g64 = g_lp = None
    if y64.numel():
        g64 = torch.autograd.grad(y64, double_leaves(leaves, memo), dy.double(), allow_unused=True)
        g_lp = torch.autograd.grad(y_lp, leaves, dy, allow_unused=True)
    for backend in usable_backends():
        if dtype == torch.bfloat16 and backend == "triton" and not ON_GPU:
            continue  # bf16 tl.dot is wrong in Triton's interpreter: bf16 triton runs on a GPU
        what = f"{backend} {cfg}"
        y = ck.compacter_adapter(*args, **kw, backend=backend)
        assert_matches_reference(y, y64, y_lp, dtype, f"{what} output")
        if g64 is None:
            continue
        g = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        for i, (a, b, c) in enumerate(zip(g, g64, g_lp)):
            assert (a is None) == (b is None), f"{what} grad #{i}"
            if a is not None:
                assert_matches_reference(a, b, c, dtype, f"{what} grad #{i} {tuple(a.shape)}")


MUTATIONS = ["rule_shape", "left_rows", "inner_shape", "bias_len", "dtype", "indivisible", "activation", "scale"]


@given(cfg=adapter_configs(), mutation=st.sampled_from(MUTATIONS), backend=st.sampled_from(["auto", "reference"]))
def test_random_invalid_configurations_raise_clear_errors(cfg, mutation, backend):
    args, residual = _build({**cfg, "bias": True}, torch.float32, "cpu")
    x, rd, ld, rgd, bd, ru, lu, rgu, bu = args
    kw = dict(activation=cfg["activation"], scale=cfg["scale"], residual=residual, backend=backend)
    n = cfg["n"]
    if mutation == "rule_shape":
        rd = torch.randn(n, n, n + 1)
    elif mutation == "left_rows":
        ld = torch.randn(n, cfg["d"] // n + 1, ld.shape[2])
    elif mutation == "inner_shape":
        if rgd is None:  # unfactorised: the down projection's width no longer matches the rest
            ld = torch.randn(n, cfg["d"] // n, cfg["k"] // n + 1)
        else:
            rgd = torch.randn(n, rgd.shape[1] + 1, rgd.shape[2])
    elif mutation == "bias_len":
        bu = torch.randn(cfg["d"] + 1)
    elif mutation == "dtype":
        lu = lu.double()
    elif mutation == "indivisible":
        x = torch.randn(3, cfg["d"] + 1)
    elif mutation == "activation":
        kw["activation"] = "softmax"
    elif mutation == "scale":
        kw["scale"] = "1.0"
    with pytest.raises((ValueError, TypeError)):
        ck.compacter_adapter(x, rd, ld, rgd, bd, ru, lu, rgu, bu, **kw)


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_in_the_reference(backend, bad):
    args, _ = _build(dict(n=4, d=32, k=16, rank=1, lead=(6,), bias=True, shared=True, residual=False,
                          activation="gelu", scale=1.0), torch.float32, DEVICE)
    args[0][2, 5] = bad
    y = ck.compacter_adapter(*args, backend=backend)
    y_ref = ref.compacter_adapter(*args)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    finite = torch.isfinite(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", [b for b in usable_backends() if b != "reference"])
def test_fp16_bottleneck_overflow_behaves_as_the_reference(backend):
    """Row 3's bottleneck pre-activation exceeds fp16's range: the reference rounds it to +-inf
    (gelu(-inf) is nan); a kernel that kept it in fp32 would silently return finite numbers."""
    args, _ = _build(dict(n=4, d=32, k=16, rank=1, lead=(8,), bias=True, shared=True, residual=False,
                          activation="gelu", scale=0.5), torch.float16, DEVICE)
    H = ref.phm_weight(*(t.detach().float() for t in args[1:4])) * 30
    with torch.no_grad():
        args[2].mul_(30)
        # Row 3 scaled so that its most negative pre-activation is 2-4x fp16's range (-inf in fp16,
        # and gelu(-inf) is nan; kept in fp32 it would give gelu = -0), with no element within 3% of
        # the overflow threshold (65520), where summation order would decide inf or finite.
        z3 = args[0][3].float() @ H
        f = next(f for f in (p * 65504 / -z3.min() for p in (2.0, 2.4, 2.9, 3.5))
                 if ((f * z3.abs() / 65520 - 1).abs() > 0.03).all())
        args[0][3] *= f
    z = args[0].float() @ H
    assert z[3].min() < -65504 and torch.isfinite(args[0]).all() and z[[0, 1, 2]].abs().max() < 65504
    y = ck.compacter_adapter(*args, backend=backend)
    y_ref = ref.compacter_adapter(*args)
    assert not torch.isfinite(y_ref[3]).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref))
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


GPU_BACKENDS = [b for b in ("triton", "cuda") if b in usable_backends()] if DEVICE == "cuda" else []


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with ~16 GB free")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_to_the_31_elements(backend):
    d, k = 1024, 32
    M = 2**31 // d + 3  # the last rows sit past int32 element offsets
    inp = compacter_inputs(lead=(M,), d=d, k=k, n=4, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    y = ck.compacter_adapter(*inp.args(), backend=backend)
    tail = slice(M - 5, M)
    y_tail = ref.compacter_adapter(inp.x[tail].float(), *[t if t is None else t.float() for t in inp.args()[1:]])
    torch.testing.assert_close(y[tail].float(), y_tail, atol=3e-2, rtol=2e-2)


# ---- bad input: ValueError / TypeError naming the argument ----------------------------------------

def _compacter_call(backend, **change):
    inp = compacter_inputs(lead=(3,), d=16, k=8, n=4, rank=1, dtype=F32, device=DEVICE, requires_grad=False)
    names = ("x", "rule_down", "left_down", "right_down", "bias_down", "rule_up", "left_up", "right_up", "bias_up")
    kw = dict(zip(names, inp.args()))
    kw.update(change)
    opts = {k: kw.pop(k) for k in ("activation", "scale", "residual") if k in kw}
    return lambda: ck.compacter_adapter(*kw.values(), backend=backend, **opts)


BAD_INPUTS = [
    (dict(activation=None), ValueError, "activation must be one of .* got None"),
    (dict(activation=3), ValueError, "activation must be one of .* got 3"),
    (dict(scale=10**400), ValueError, "scale must be a finite real number"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite real number"),
    (dict(x=torch.randn(3, 12)), ValueError, "x has 12 features, the adapter .* expects 16"),
    (dict(x=torch.randn(3, 17)), ValueError, "x has 17 features, the adapter .* expects 16"),
    (dict(rule_down=None), TypeError, "rule_down must be a torch.Tensor, got NoneType"),
    (dict(left_up=None), TypeError, "left_up must be a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS, ids=[m for *_, m in BAD_INPUTS])
def test_bad_input_is_named_on_every_backend(backend, change, exc, match):
    op_checks.check_bad_input(_compacter_call, backend, change, exc, match)


def test_a_repeated_call_skips_no_check_that_matters():
    """After a good call, every bad variant of the same arguments still raises its named error
    (nothing about a call is remembered)."""
    good = _compacter_call("reference")
    good()
    for change, exc, match in BAD_INPUTS:
        with pytest.raises(exc, match=match):
            _compacter_call("reference", **change)()
    with pytest.raises(TypeError, match="right_down has dtype torch.float64"):
        _compacter_call("reference", right_down=torch.randn(4, 1, 2, dtype=torch.float64))()
    with pytest.raises(ValueError, match=r"activation must be one of .* got \['gelu'\]"):
        _compacter_call("reference", activation=["gelu"])()  # unhashable: no signature, full checks


def _compacter_call_f64(**change):
    inp = compacter_inputs(d=16, k=8, n=4, rank=2, requires_grad=False)
    kwargs = dict(zip(("x", "rule_down", "left_down", "right_down", "bias_down", "rule_up", "left_up",
                       "right_up", "bias_up"), inp.args()))
    kwargs.update(change)
    opts = {k: kwargs.pop(k) for k in ("activation", "scale", "residual", "backend") if k in kwargs}
    return lambda: ck.compacter_adapter(*kwargs.values(), **opts)


F64 = torch.float64
BAD_ADAPTER_INPUTS = [  # the default backend ("auto": the reference on the CPU), float64
    (dict(x=torch.randn(3, 15, dtype=F64)), ValueError, r"x has 15 features, the adapter .* expects 16"),
    (dict(left_down=torch.randn(4, 3, 2, dtype=F64)), ValueError, r"left_down must have shape \(4, 4, 2\)"),
    (dict(right_down=torch.randn(4, 3, 2, dtype=F64)), ValueError, r"right_down must have shape \(4, 2, 2\)"),
    (dict(rule_down=torch.randn(4, 4, 3, dtype=F64)), ValueError, r"rule_down must have shape \(4, 4, 4\)"),
    (dict(rule_up=torch.randn(4, 4, dtype=F64)), ValueError, "rule_up must be 3-D"),
    (dict(bias_down=torch.randn(9, dtype=F64)), ValueError, r"bias_down must have shape \(8,\)"),
    (dict(bias_up=torch.randn(8, dtype=F64)), ValueError, r"bias_up must have shape \(16,\)"),
    (dict(right_up=torch.randn(4, 2, 3, dtype=F64)), ValueError, r"right_up \(or left_up\) maps to 12 features, expected 16"),
    (dict(bias_up=torch.randn(16, dtype=torch.float32)), TypeError, "bias_up has dtype torch.float32 but x has"),
    (dict(x=torch.randint(0, 5, (3, 16))), TypeError, "x must be a floating tensor"),
    (dict(x=torch.randn(3, 16, dtype=torch.complex64)), TypeError, "x must be a floating tensor"),
    (dict(x=[1.0] * 16), TypeError, "x must be a torch.Tensor, got list"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(scale="0.5"), TypeError, "scale must be a real number, got str"),
    (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a real number, got Tensor"),
    (dict(residual=torch.randn(4, 16, dtype=F64)), ValueError, r"residual must have shape \(3, 16\)"),
    (dict(left_up=torch.randn(4, 2, 2, device="meta", dtype=F64)), ValueError, "left_up is on meta but x is on cpu"),
]


@reference_only
@pytest.mark.parametrize("change,exc,match", BAD_ADAPTER_INPUTS, ids=[m for _, _, m in BAD_ADAPTER_INPUTS])
def test_bad_compacter_input_is_named(change, exc, match):
    with pytest.raises(exc, match=match):
        _compacter_call_f64(**change)()


@reference_only
def test_noncontiguous_and_broadcast_inputs_give_correct_results():
    inp = compacter_inputs(lead=(4,), d=16, k=8, n=4, requires_grad=False)
    x_wide = torch.randn(4, 32, dtype=F64)
    x = x_wide[:, ::2]  # strided view
    x_bcast = torch.randn(1, 16, dtype=F64).expand(4, 16)  # stride 0
    for xi in (x, x_bcast):
        args = (xi,) + inp.args()[1:]
        torch.testing.assert_close(ck.compacter_adapter(*args), ref.compacter_adapter(xi.contiguous(), *inp.args()[1:]))


BAD_LAYERS = [
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
]


@pytest.mark.parametrize("make,exc,match", BAD_LAYERS, ids=[m for *_, m in BAD_LAYERS])
def test_bad_layer_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- the reference against itself: two formulations, gradcheck in float64 --------------------------

@reference_only
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("rank", [1, 4, None])
@pytest.mark.parametrize("shared_rule", [True, False])
def test_compacter_two_formulations_agree_with_gradients(activation, rank, shared_rule):
    inp = compacter_inputs(lead=(2, 5), d=24, k=12, n=4, rank=rank, shared_rule=shared_rule)
    dy = torch.randn_like(inp.x)
    y1 = ref.compacter_adapter(*inp.args(), activation=activation, scale=0.7)
    y2 = ref.compacter_adapter_factored(*inp.args(), activation=activation, scale=0.7)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1, inp.tensors(), dy)
    g2 = torch.autograd.grad(y2, inp.tensors(), dy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@reference_only
def test_compacter_is_the_dense_adapter_with_kron_weights():
    inp = compacter_inputs(d=16, k=8, n=4, rank=2, requires_grad=False)
    r = torch.randn_like(inp.x)
    y = ref.compacter_adapter(*inp.args(), activation="gelu_tanh", scale=2.0, residual=r)
    Hd = kron_loop(inp.rule_down, inp.left_down, inp.right_down)
    Hu = kron_loop(inp.rule_up, inp.left_up, inp.right_up)
    z = inp.x @ Hd + inp.bias_down
    expected = r + 2.0 * (torch.nn.functional.gelu(z, approximate="tanh") @ Hu + inp.bias_up)
    torch.testing.assert_close(y, expected)


@reference_only
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("rank", [1, None])
@pytest.mark.parametrize("shared_rule", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck_compacter_adapter(activation, rank, shared_rule, with_residual):
    inp = compacter_inputs(lead=(3,), d=8, k=4, n=2, rank=rank, shared_rule=shared_rule)
    residual = torch.randn_like(inp.x, requires_grad=True) if with_residual else None

    args = inp.args()
    assert torch.autograd.gradcheck(
        lambda *t: ref.compacter_adapter(*t, activation=activation, scale=0.5, residual=residual), args)
    if with_residual:
        assert torch.autograd.gradcheck(
            lambda r: ref.compacter_adapter(*args, activation=activation, residual=r), (residual,))
