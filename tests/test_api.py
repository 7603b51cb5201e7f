"""The public API: backend choice and availability, meta and fake tensors, the one-route dispatch.
(Each op's errors for bad input are in that op's file, tests/test_<op>.py.)"""

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
