"""The compiled extension `compacter_kernels._C`: build, import guard, op registration.

Without a GPU these still check the build (import, schema, fake impl, staleness) and the
pure-torch backward; the kernel itself is checked by the GPU tests at the bottom.
CI sets COMPACTER_KERNELS_REQUIRE_EXTENSION=1 so that a missing build fails instead of skipping.
"""
import contextlib
import os
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import compacter_kernels
from compacter_kernels import _extension
from compacter_kernels import functional as F
from compacter_kernels.ops.common import Projection
from compacter_kernels._source_hash import source_hash

REQUIRE = os.environ.get("COMPACTER_KERNELS_REQUIRE_EXTENSION") == "1"
SCHEMA = ("compacter_kernels::cuda_build_h(Tensor?[] rules, Tensor[] lefts, Tensor?[] rights, ScalarType dtype) "
          "-> Tensor[]")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.fixture
def ext():
    ok, reason = _extension.status()
    if not ok:
        (pytest.fail if REQUIRE else pytest.skip)(f"CUDA extension unavailable: {reason}")
    return _extension.load()


def kron_sum(rule, left, right):
    """Plain-torch H = sum_i kron(A[i], B[i]), independent of the op and of the einsum backward."""
    B = left if right is None else left @ right
    return sum(torch.kron(rule[i], B[i]) for i in range(rule.shape[0]))


def factors(n, I, O, r, dtype=torch.float64, device="cpu", factorised=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    if factorised:
        return mk(n, n, n), mk(n, I // n, r), mk(n, r, O // n)
    return mk(n, n, n), mk(n, I // n, O // n), None


# --- build / import ------------------------------------------------------------------------

def test_status_is_explained():
    ok, reason = _extension.status()
    assert isinstance(ok, bool) and reason
    if REQUIRE:
        assert ok, reason
    if not ok:
        assert _extension.load() is None
        pytest.skip(f"CUDA extension unavailable: {reason}")
    assert _extension.load() is not None


def test_build_info(ext):
    info = ext.build_info()
    assert info["version"] == compacter_kernels.__version__
    assert len(info["source_hash"]) == 64 and int(info["source_hash"], 16) >= 0
    assert info["torch_version"] == str(torch.__version__)
    assert isinstance(info["cuda_version"], int) and info["cuda_version"] >= 11000


def test_schema(ext):
    op = torch.ops.compacter_kernels.cuda_build_h.default
    assert str(op._schema) == SCHEMA
    assert torch.Tag.pt2_compliant_tag in op.tags


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factorised", [True, False])
def test_fake_impl(ext, dtype, factorised):
    n, I, O, r = 4, 32, 24, 3
    with FakeTensorMode():  # fake CUDA tensors need no GPU
        rule, left, right = factors(n, I, O, r, dtype, "cuda", factorised)
        (out,) = torch.ops.compacter_kernels.cuda_build_h([rule], [left], [right], dtype)
    assert out.shape == (I, O) and out.dtype == dtype and out.device.type == "cuda"
    rule, left, right = factors(n, I, O, r, dtype, "meta", factorised)
    (meta,) = torch.ops.compacter_kernels.cuda_build_h([rule], [left], [right], dtype)
    assert meta.shape == (I, O) and meta.dtype == dtype and meta.device.type == "meta"


def test_cpu_has_no_kernel(ext):
    rule, left, right = factors(4, 8, 8, 1)
    with pytest.raises(NotImplementedError, match="cuda_build_h.*'CPU' backend"):
        torch.ops.compacter_kernels.cuda_build_h([rule], [left], [right], rule.dtype)


def test_not_built_reason(monkeypatch):
    # Simulate a pure-Python install: the import of _C fails with ModuleNotFoundError.
    monkeypatch.delattr(compacter_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "compacter_kernels._C", None)
    module, ok, reason = _extension._try_load()
    assert module is None and not ok
    assert reason.startswith("not built") and "--no-build-isolation" in reason


def test_broken_build_reason(monkeypatch):
    # A .so built against another torch fails to import with "undefined symbol".
    def broken(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c104impl8GPUTrace")

    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    module, ok, reason = _extension._try_load()
    assert module is None and not ok
    assert "undefined symbol" in reason and "another torch" in reason and "rebuild" in reason


def _fake_module(**info):
    base = dict(version=compacter_kernels.__version__, torch_version=str(torch.__version__),
                source_hash="0" * 64, cuda_version=13000)
    return types.SimpleNamespace(build_info=lambda: {**base, **info})


def test_staleness_checks(monkeypatch, tmp_path):
    (tmp_path / "k.cu").write_text("// v1\n")
    monkeypatch.setattr(_extension, "_source_tree", lambda: tmp_path)
    assert _extension._stale_reason(_fake_module(source_hash=source_hash(tmp_path))) is None
    assert "changed" in _extension._stale_reason(_fake_module(source_hash="f" * 64))
    assert "version 0.0.0" in _extension._stale_reason(_fake_module(version="0.0.0"))
    assert "torch 1.0" in _extension._stale_reason(_fake_module(torch_version="1.0"))
    # No source tree next to the package (wheel install): the hash is not checked.
    monkeypatch.setattr(_extension, "_source_tree", lambda: None)
    assert _extension._stale_reason(_fake_module(source_hash="f" * 64)) is None


def test_stale_build_disables_extension(ext, monkeypatch, tmp_path):
    (tmp_path / "edited.cu").write_text("// not what was built\n")
    monkeypatch.setattr(_extension, "_source_tree", lambda: tmp_path)
    module, ok, reason = _extension._try_load()
    assert module is None and not ok
    assert reason.startswith("stale build") and "rebuild" in reason


def test_source_hash_sees_edits(tmp_path):
    (tmp_path / "a.cu").write_text("x")
    (tmp_path / "notes.txt").write_text("ignored")
    h = source_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("still ignored")
    assert source_hash(tmp_path) == h
    (tmp_path / "a.cu").write_text("y")
    assert source_hash(tmp_path) != h


# --- the fused adapter ops (cuda_adapter_fwd / _bwd, and the Function over them) -------------
# Registration, fake impls and the autograd glue, checked on meta / fake tensors: no GPU needed.
# The kernels themselves are checked against the reference by the op files (tests/test_<op>.py) on a GPU.

ADAPTER_SCHEMAS = {
    "cuda_adapter_fwd": "compacter_kernels::cuda_adapter_fwd(Tensor x, Tensor? residual, Tensor h_down, "
                        "Tensor? bias_down, Tensor h_up, Tensor? bias_up, int activation, float scale, "
                        "ScalarType out_dtype, bool store_z=True) -> (Tensor, Tensor)",
    "cuda_adapter_bwd": "compacter_kernels::cuda_adapter_bwd(Tensor dy, Tensor x, Tensor z, Tensor h_down, "
                        "Tensor h_up, Tensor? rule_down, Tensor left_down, Tensor? right_down, Tensor? bias_down, "
                        "Tensor? rule_up, Tensor left_up, Tensor? right_up, Tensor? bias_up, int activation, "
                        "float scale, bool has_residual, bool shared_rule) "
                        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cuda_build_h": "compacter_kernels::cuda_build_h(Tensor?[] rules, Tensor[] lefts, Tensor?[] rights, "
                    "ScalarType dtype) -> Tensor[]",
    "cuda_phm_grads": "compacter_kernels::cuda_phm_grads(Tensor dh, Tensor? rule, Tensor left, Tensor? right) "
                      "-> (Tensor, Tensor, Tensor)",
}


def test_adapter_schemas(ext):
    for name, schema in ADAPTER_SCHEMAS.items():
        op = getattr(torch.ops.compacter_kernels, name).default
        assert str(op._schema) == schema
        assert torch.Tag.pt2_compliant_tag in op.tags
    # No Python op of its own: the backend's Function calls these C++ ops directly.
    assert not hasattr(torch.ops.compacter_kernels, "cuda_compacter_fwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual_dtype", [None, "same", torch.float32])
def test_adapter_fake_impls(ext, dtype, residual_dtype):
    M, d, k = 10, 48, 24
    out_dtype = dtype if residual_dtype in (None, "same") else residual_dtype
    for device, mode in (("cuda", FakeTensorMode), ("meta", None)):
        with mode() if mode else contextlib.nullcontext():
            x = torch.empty(M, d, dtype=dtype, device=device)
            res = None if residual_dtype is None else torch.empty(
                M, d, dtype=dtype if residual_dtype == "same" else residual_dtype, device=device)
            h_down = torch.empty(d, k, dtype=dtype, device=device)
            h_up = torch.empty(k, d, dtype=dtype, device=device)
            y, z = torch.ops.compacter_kernels.cuda_adapter_fwd(
                x, res, h_down, torch.empty(k, dtype=dtype, device=device), h_up, None, 0, 0.5, out_dtype)
            dy = torch.empty(M, d, dtype=out_dtype, device=device)
            # A PHM down projection (n = 4, rank 2) and a dense fp32 up weight.
            f32 = dict(dtype=torch.float32, device=device)
            rule, left, right = torch.empty(4, 4, 4, **f32), torch.empty(4, d // 4, 2, **f32), torch.empty(4, 2, k // 4, **f32)
            w_up, b_up = torch.empty(k, d, **f32), torch.empty(d, **f32)
            grads = torch.ops.compacter_kernels.cuda_adapter_bwd(dy, x, z, h_down, h_up, rule, left, right, None, None,
                                                                 w_up, None, b_up, 1, 0.5, res is not None, False)
        assert (y.shape, y.dtype, y.device.type) == ((M, d), out_dtype, device)
        assert (z.shape, z.dtype, z.device.type) == ((M, k), dtype, device)
        f32 = torch.float32
        expected = [((M, d), dtype), ((M, d) if res is not None else (0,), out_dtype), ((4, 4, 4), f32),
                    ((4, d // 4, 2), f32), ((4, 2, k // 4), f32), ((0,), dtype), ((0,), dtype), ((k, d), f32),
                    ((0,), dtype), ((d,), f32)]
        assert [(tuple(g.shape), g.dtype) for g in grads] == expected
        assert all(g.device.type == device for g in grads)


def _meta_compacter_inputs(dtype, factorised=True, d=32, k=16, n=4, r=2, lead=(3, 5)):
    mk = lambda *s: torch.empty(*s, dtype=dtype, device="meta", requires_grad=True)  # noqa: E731
    x = mk(*lead, d)
    down = (mk(n, n, n), mk(n, d // n, r), mk(n, r, k // n)) if factorised else (mk(n, n, n), mk(n, d // n, k // n), None)
    up = (mk(n, n, n), mk(n, k // n, r), mk(n, r, d // n)) if factorised else (mk(n, n, n), mk(n, k // n, d // n), None)
    return x, down, mk(k), up, mk(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factorised", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_adapter_autograd_glue_on_meta(ext, dtype, factorised, with_residual):
    """Forward and backward of the cuda entry points on meta tensors: every op's fake impl and
    the autograd formula's shapes and dtypes (a gradient for every input, of its shape)."""

    def check_grads(y, leaves):
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        for t, g in zip(leaves, grads):
            assert g is not None and g.shape == t.shape and g.dtype == t.dtype and g.device.type == "meta"

    x, (rd, ld, rgd), bd, (ru, lu, rgu), bu = _meta_compacter_inputs(dtype, factorised)
    residual = torch.empty_like(x, requires_grad=True) if with_residual else None
    y = F._fused_adapter("cuda", x, Projection(rd, ld, rgd, bd), Projection(ru, lu, rgu, bu), "silu", 0.5, residual)
    assert y.shape == x.shape and y.dtype == dtype and y.device.type == "meta"
    check_grads(y, [t for t in (x, rd, ld, rgd, bd, ru, lu, rgu, bu, residual) if t is not None])
    # The dense (Houlsby) entry point.
    w_down = torch.empty(32, 16, dtype=dtype, device="meta", requires_grad=True)
    w_up = torch.empty(16, 32, dtype=dtype, device="meta", requires_grad=True)
    y = F._fused_adapter("cuda", x, Projection(None, w_down, None, None), Projection(None, w_up, None, bu), "relu",
                         2.0, residual)
    assert y.shape == x.shape and y.dtype == dtype
    check_grads(y, [t for t in (x, w_down, w_up, bu, residual) if t is not None])


def test_cuda_adapter_rejects_cpu_tensors(ext):

    x, hd, hu = torch.randn(4, 8), torch.randn(8, 4), torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match="cuda_adapter_fwd.*'CPU' backend"):
        torch.ops.compacter_kernels.cuda_adapter_fwd(x, None, hd, None, hu, None, 0, 1.0, torch.float32)
    with pytest.raises(NotImplementedError, match="cuda_adapter_bwd.*'CPU' backend"):
        torch.ops.compacter_kernels.cuda_adapter_bwd(x, x, torch.randn(4, 4), hd, hu, None, hd, None, None, None, hu,
                                                     None, None, 0, 1.0, False, False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got x on cpu"):
        F._fused_adapter("cuda", x, Projection(None, hd, None, None), Projection(None, hu, None, None), "gelu", 1.0,
                         None)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got x on cpu"):
        F._fused_adapter("cuda", x, Projection(*factors(4, 8, 4, 1, torch.float32), None),
                         Projection(*factors(4, 4, 8, 1, torch.float32), None), "gelu", 1.0, None)


# --- PHM linear on the cuda backend (cuda_build_h + cuBLAS, ops/cuda/phm_linear.py) -----------
# Registration, fake impl and autograd glue without a GPU; the backward math on CPU in float64;
# the run against the reference is tests/test_phm_linear.py's (backend "cuda") and the GPU tests here.

def _close_fp32(a, e):
    """Within fp32 error of e, relative to e's largest element (H is summed in fp32)."""
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))


def _phm_linear_inputs(dtype, device, factorised=True, bias=True, lead=(2, 5), n=4, I=32, O=24, r=2):
    rule, left, right = factors(n, I, O, r, dtype, device, factorised)
    x = torch.randn(*lead, I, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(O, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return [t if t is None else t.requires_grad_() for t in (x, rule, left, right, b)]


def test_cuda_phm_linear_registered(ext):
    from compacter_kernels.backends import FUNCTIONS, available_backends
    from compacter_kernels.ops.cuda import adapter as cuda_adapter
    from compacter_kernels.ops.cuda import phm_linear as cuda_phm_linear

    available_backends()
    assert FUNCTIONS["cuda"] == {"adapter": cuda_adapter.CudaAdapter, "phm_linear": cuda_phm_linear.CudaPHMLinear}


def test_cuda_phm_linear_rejects_cpu_tensors(ext):
    args = _phm_linear_inputs(torch.float32, "cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="the cuda backend needs CUDA tensors, got a tensor on cpu"):
            compacter_kernels.phm_linear(*args, backend="cuda")
    else:  # without a GPU the backend is unavailable, and says why
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: .*no GPU is visible"):
            compacter_kernels.phm_linear(*args, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got x on cpu"):
        F._fused_phm_linear("cuda", args[0], Projection(*args[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factorised", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_phm_linear_fake_and_meta(ext, dtype, factorised, bias):
    """Shapes and dtypes: the forward on fake CUDA tensors, the backward formula there too (the
    fp32-output mm of dH included; the autograd engine itself needs a real GPU for CUDA tensors),
    and forward + autograd backward on meta tensors: a gradient of its input's shape and dtype
    for every input."""
    from compacter_kernels.ops.cuda import phm_linear as cuda_phm_linear

    with FakeTensorMode():
        x, *params = _phm_linear_inputs(dtype, "cuda", factorised, bias)
        y = F._fused_phm_linear("cuda", x, Projection(*params))
        H = torch.empty(32, 24, dtype=dtype, device="cuda")
        dx, dH, db = cuda_phm_linear.phm_linear_backward(y.reshape(10, 24), x.reshape(10, 32), H, bias)
    assert (y.shape, y.dtype, y.device.type) == ((2, 5, 24), dtype, "cuda")
    assert (dx.shape, dx.dtype, dH.shape, dH.dtype) == ((10, 32), dtype, (32, 24), torch.float32)
    assert (db.shape, db.dtype) == ((24,), torch.float32) if bias else db is None
    args = _phm_linear_inputs(dtype, "meta", factorised, bias)
    y = F._fused_phm_linear("cuda", args[0], Projection(*args[1:]))
    assert (y.shape, y.dtype, y.device.type) == ((2, 5, 24), dtype, "meta")
    leaves = [t for t in args if t is not None]
    for t, g in zip(leaves, torch.autograd.grad(y, leaves, torch.ones_like(y))):
        assert (g.shape, g.dtype, g.device.type) == (t.shape, t.dtype, "meta")


@pytest.mark.parametrize("factorised", [True, False])
@pytest.mark.parametrize("M", [0, 1, 37])
def test_cuda_phm_linear_backward_math(ext, factorised, M):
    """phm_linear_backward (the op's backward up to dH, plain torch; cuda_phm_grads maps dH to the
    factors, checked in the emulated run) against autograd of the reference, in float64 on CPU."""
    from compacter_kernels.ops.cuda.phm_linear import phm_linear_backward

    x, rule, left, right, b = _phm_linear_inputs(torch.float64, "cpu", factorised, lead=(M,))
    y = compacter_kernels.reference.phm_linear(x, rule, left, right, b)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, rule, left, right, b) if t is not None]
    expected = torch.autograd.grad(y, leaves, dy)
    H = kron_sum(rule, left, right).detach()
    dx, dH, db = phm_linear_backward(dy, x.detach(), H, has_bias=True)
    factor_leaves = [t for t in (rule, left, right) if t is not None]
    got = [dx, *torch.autograd.grad(kron_sum(rule, left, right), factor_leaves, dH), db]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert phm_linear_backward(dy, x.detach(), H, has_bias=False)[2] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_phm_linear_backward_keeps_dH_in_fp32(ext, dtype):
    """dH and db of low-precision x and dy come back in fp32, unrounded: equal to the fp64 product
    of the same (rounded) inputs up to fp32 accumulation."""
    from compacter_kernels.ops.cuda.phm_linear import phm_linear_backward

    x, dy, H = torch.randn(67, 32).to(dtype), torch.randn(67, 24).to(dtype), torch.randn(32, 24).to(dtype)
    dx, dH, db = phm_linear_backward(dy, x, H, has_bias=True)
    assert (dx.dtype, dH.dtype, db.dtype) == (dtype, torch.float32, torch.float32)
    torch.testing.assert_close(dH.double(), x.double().t() @ dy.double(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(db.double(), dy.double().sum(0), rtol=1e-6, atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [0, 1031])
def test_cuda_phm_linear_backward_keeps_dH_in_fp32_on_gpu(ext, dtype, M):
    """The fp32-output cuBLAS matmul (torch.mm(..., out_dtype=torch.float32)) for dH."""
    from compacter_kernels.ops.cuda.phm_linear import phm_linear_backward

    x, dy, H = (torch.randn(*s, device="cuda").to(dtype) for s in ((M, 96), (M, 48), (96, 48)))
    dx, dH, db = phm_linear_backward(dy, x, H, has_bias=True)
    assert (dx.dtype, dH.dtype, db.dtype) == (dtype, torch.float32, torch.float32)
    torch.testing.assert_close(dH.double(), x.double().t() @ dy.double(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db.double(), dy.double().sum(0), rtol=1e-4, atol=1e-3)


@requires_gpu
@pytest.mark.parametrize("M", [0, 1, 300])
def test_cuda_phm_linear_on_gpu(ext, M):
    """The real op (cuda_build_h, cuBLAS) against the reference, M = 0 included, and opcheck
    (tests/test_phm_linear.py holds it to the common standard over shapes and dtypes)."""
    args = _phm_linear_inputs(torch.float32, "cuda", lead=(M,))
    y = compacter_kernels.phm_linear(*args, backend="cuda")
    y_ref = compacter_kernels.reference.phm_linear(*args)
    _close_fp32(y, y_ref)
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, args, dy), torch.autograd.grad(y_ref, args, dy)):
        _close_fp32(g, e)
    if M:
        torch.library.opcheck(torch.ops.compacter_kernels.cuda_phm_linear_fwd.default, tuple(args))
