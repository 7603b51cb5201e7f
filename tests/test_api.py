"""The public API: backend choice, availability, and clear errors for bad input."""

import pytest
import torch

import compacter_kernels as ck
from compacter_kernels import reference as ref
from utils import compacter_inputs, dense_inputs, phm_factors, why_backend_cannot_run


def test_available_backends_reports_every_backend_with_a_reason():
    status = ck.available_backends()
    assert set(status) == set(ck.BACKENDS) == {"reference", "triton", "cuda"}
    assert status["reference"].available
    for name, s in status.items():
        assert isinstance(s.available, bool) and s.reason, name


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_says_why(backend):
    s = ck.available_backends()[backend]
    if s.available:
        pytest.skip(f"{backend} is available here: {s.reason}")
    inp = compacter_inputs(requires_grad=False)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run here: .+"):
        ck.compacter_adapter(*inp.args(), backend=backend)


def test_unknown_backend():
    x, *w = dense_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ck.adapter(x, *w, backend="cublas")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cpu_runs_the_reference(backend):
    inp = compacter_inputs(lead=(2, 3), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    y = ck.compacter_adapter(*inp.args(), activation="silu", scale=0.3, backend=backend)
    torch.testing.assert_close(y, ref.compacter_adapter(*inp.args(), activation="silu", scale=0.3))
    x, wd, bd, wu, bu = dense_inputs(dtype=torch.float32)
    torch.testing.assert_close(ck.adapter(x, wd, bd, wu, bu, backend=backend), ref.adapter(x, wd, bd, wu, bu))
    rule, left, right = phm_factors(4, 16, 8, 2, dtype=torch.float32)
    torch.testing.assert_close(ck.phm_linear(x, rule, left, right, backend=backend),
                               ref.phm_linear(x, rule, left, right))
    torch.testing.assert_close(ck.phm_weight(rule, left, right), ref.phm_weight(rule, left, right))


def test_gradients_flow_through_the_api():
    inp = compacter_inputs(d=16, k=8, n=4)
    y = ck.compacter_adapter(*inp.args())
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, inp.tensors(), dy)
    g_ref = torch.autograd.grad(ref.compacter_adapter(*inp.args()), inp.tensors(), dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ---- bad input: ValueError/TypeError naming the argument, before any kernel ------------------

def _adapter_call(**change):
    inp = compacter_inputs(d=16, k=8, n=4, rank=2, requires_grad=False)
    kwargs = dict(zip(("x", "rule_down", "left_down", "right_down", "bias_down", "rule_up", "left_up",
                       "right_up", "bias_up"), inp.args()))
    kwargs.update(change)
    opts = {k: kwargs.pop(k) for k in ("activation", "scale", "residual", "backend") if k in kwargs}
    return lambda: ck.compacter_adapter(*kwargs.values(), **opts)


F64 = torch.float64
BAD_ADAPTER_INPUTS = [
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


@pytest.mark.parametrize("change,exc,match", BAD_ADAPTER_INPUTS, ids=[m for _, _, m in BAD_ADAPTER_INPUTS])
def test_bad_compacter_input_is_named(change, exc, match):
    with pytest.raises(exc, match=match):
        _adapter_call(**change)()


def test_bad_dense_adapter_input_is_named():
    x, wd, bd, wu, bu = dense_inputs(d=16, k=8, requires_grad=False)
    with pytest.raises(ValueError, match=r"w_down must have shape \(16, bottleneck\)"):
        ck.adapter(x, wd.t(), bd, wu, bu)
    with pytest.raises(ValueError, match=r"w_up must have shape \(8, 16\)"):
        ck.adapter(x, wd, bd, wu[:, :8], bu)
    with pytest.raises(ValueError, match=r"b_down must have shape \(8,\)"):
        ck.adapter(x, wd, bu, wu, bu)
    with pytest.raises(TypeError, match="w_up has dtype torch.float16"):
        ck.adapter(x, wd, bd, wu.half(), bu)


def test_bad_phm_linear_input_is_named():
    rule, left, right = phm_factors(4, 16, 8, 1)
    x = torch.randn(2, 16, dtype=F64)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ck.phm_linear(x, rule, left, right, torch.randn(16, dtype=F64))
    with pytest.raises(ValueError, match="x has 12 features, the projection .* expects 16"):
        ck.phm_linear(x[:, :12], rule, left, right)
    with pytest.raises(ValueError, match=r"x has 16 features, the projection .* expects 8"):
        ck.phm_linear(x, rule, left[:, :2], None)


def test_noncontiguous_and_broadcast_inputs_give_correct_results():
    inp = compacter_inputs(lead=(4,), d=16, k=8, n=4, requires_grad=False)
    x_wide = torch.randn(4, 32, dtype=F64)
    x = x_wide[:, ::2]  # strided view
    x_bcast = torch.randn(1, 16, dtype=F64).expand(4, 16)  # stride 0
    for xi in (x, x_bcast):
        args = (xi,) + inp.args()[1:]
        torch.testing.assert_close(ck.compacter_adapter(*args), ref.compacter_adapter(xi.contiguous(), *inp.args()[1:]))


def test_meta_tensors_give_shapes_through_the_reference():
    """Shape inference on the meta device goes through validation (autocast check included)."""
    inp = compacter_inputs(lead=(2, 3), d=16, k=8, n=4, device="meta", requires_grad=False)
    assert ck.compacter_adapter(*inp.args(), backend="reference").shape == (2, 3, 16)


# ---- one route per op: an autograd Function over custom ops -----------------------------------

def test_meta_fake_dispatch_modes_and_compile_take_the_one_route():
    """A kernel backend's op is one autograd Function over custom ops, whatever the caller: meta
    tensors, FakeTensorMode and dispatch modes see the custom ops (their fake impls, no launch),
    and torch.compile(fullgraph=True) traces the same Function with the same values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    if why_backend_cannot_run("triton") is not None:
        pytest.skip(why_backend_cannot_run("triton"))
    seen = []

    class Seen(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    inp = compacter_inputs(lead=(3,), d=16, k=8, n=4, rank=1, dtype=torch.float32)
    meta = [t if t is None else t.detach().to("meta").requires_grad_() for t in inp.args()]
    y = ck.compacter_adapter(*meta, backend="triton")
    assert y.device.type == "meta" and y.shape == meta[0].shape
    assert torch.autograd.grad(y.sum(), meta[0])[0].shape == meta[0].shape
    with FakeTensorMode() as mode:
        fake = [t if t is None else mode.from_tensor(t) for t in inp.args()]
        assert ck.compacter_adapter(*fake, backend="triton").shape == inp.x.shape
    with FlopCounterMode(display=False), Seen():
        y_eager = ck.compacter_adapter(*inp.args(), backend="triton")
    assert "compacter_kernels::triton_adapter_fwd" in seen
    compiled = torch.compile(lambda *a: ck.compacter_adapter(*a, backend="triton"), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*inp.args()), y_eager)


# ---- what a new user sees: the install's state, said where they look -----------------------------

def test_missing_extension_warns_once_on_a_cuda_machine(monkeypatch):
    from compacter_kernels import backends

    monkeypatch.setattr(backends, "_warned_no_extension", False)
    monkeypatch.setitem(backends._STATUS, "cuda", backends.BackendStatus(False, "not built (reinstall with `X`)"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.warns(UserWarning, match=r"cuda backend is unavailable: not built \(reinstall with `X`\)"):
        backends.warn_if_extension_missing()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.warn_if_extension_missing()  # once per process


def test_python_m_compacter_kernels_reports_every_backend():
    import subprocess
    import sys

    from utils import checkout_env

    env = checkout_env(drop=("TRITON_INTERPRET",))
    out = subprocess.run([sys.executable, "-m", "compacter_kernels"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for word in ("compacter_kernels 0.", "torch ", "GPU", "reference ", "triton ", "cuda ", "backend='auto'"):
        assert word in out.stdout, out.stdout
    if not torch.cuda.is_available():  # triton cannot run kernels here: said so, with the way for tests
        line = next(line for line in out.stdout.splitlines() if line.startswith("  triton "))
        assert "UNAVAILABLE" in line and "no GPU is visible" in line and "TRITON_INTERPRET=1" in line, line
        from compacter_kernels import _extension

        if _extension.status()[0]:  # built: said of cuda as of triton, with the way for tests
            line = next(line for line in out.stdout.splitlines() if line.startswith("  cuda "))
            assert "UNAVAILABLE" in line and "is built, but no GPU is visible" in line and "EMULATE_CUDA" in line, line
