"""ck.adapter (the dense Houlsby adapter) on every backend: outputs and every gradient against the
reference over shapes, dtypes and each path of the kernels; the generic op checks
(tests/op_checks.py: odd layouts, second derivatives, torch.func, forward-mode AD, the residual's
gradient, empty widths, a bottleneck wider than the kernels, autocast); torch.compile in a fresh
process; bad input named; gradcheck of the reference in float64.

Its nn.Linear-weights form (`functional._adapter_linear`, the AdapterHub swap-in's entry) gets
the same generic checks here; its launches are counted in tests/test_counts.py and its swap-in
is tested in tests/test_integrations.py.
"""

import subprocess
import sys

import pytest
import torch

import compacter_kernels as ck
import op_checks
from compacter_kernels import reference as ref
from op_checks import (DEVICE, DTYPES, F32, backend, kernel, kernel_backend, narrow_column_chunks,  # noqa: F401
                       poison_outputs, reference_only, skip_unsupported)
from utils import CUDA_EMULATED, check_op, checkout_env, dense_inputs, why_backend_cannot_run


# ---- every kernel backend against the reference --------------------------------------------------

@pytest.mark.parametrize("d,k", [(48, 24), (32, 20), (64, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_adapter_matches_reference(kernel_backend, d, k, dtype):
    skip_unsupported(dtype, kernel_backend)
    args = dense_inputs(lead=(3, 7), d=d, k=k, dtype=dtype, device=DEVICE)
    check_op(kernel("adapter", kernel_backend), ref.adapter, args, dtype, f"houlsby d={d} k={k}", activation="relu",
             scale=2.0)


# Sizes that take each path of the kernels (the CUDA kernels' in brackets): rows of x kept on
# chip or streamed over d in chunks [32 rows x d x 2 B vs 64 KiB], k > 128 [16-row blocks],
# k > 256 [two passes over d], d not a multiple of 8 [scalar loads], x with an odd row stride.
PATH_SHAPES = [  # (M, d, k, dtype)
    (33, 768, 24, torch.float16), (17, 1100, 24, torch.float16), (37, 100, 192, torch.float32),
    (19, 72, 300, torch.float32), (45, 36, 20, torch.bfloat16),
]


@pytest.mark.parametrize("M,d,k,dtype", PATH_SHAPES)
def test_kernel_paths(kernel_backend, M, d, k, dtype):
    skip_unsupported(dtype, kernel_backend)
    x, *params = dense_inputs(lead=(M,), d=d + 3, k=k, dtype=dtype, device=DEVICE)
    # x (M, d) with row stride d + 3; the weights cut to d.
    x = x.detach()[:, :d].requires_grad_()
    wd, bd, wu, bu = params
    wd, wu, bu = (t.detach()[sl].contiguous().requires_grad_() for t, sl in
                  ((wd, slice(0, d)), (wu, (slice(None), slice(0, d))), (bu, slice(0, d))))
    check_op(kernel("adapter", kernel_backend), ref.adapter, (x, wd, bd, wu, bu), dtype, f"paths M={M} d={d} k={k}",
             activation="gelu", scale=0.5)



def test_dense_adapter_gradients_in_column_chunks(narrow_column_chunks):
    args = dense_inputs(lead=(3, 7), d=48, k=20, dtype=torch.float32, device=DEVICE)
    check_op(kernel("adapter", "triton"), ref.adapter, args, torch.float32, "houlsby in column chunks",
             activation="relu")

def test_opcheck_triton_ops():
    """The triton forward op under the Function (its schema, fake impl, no aliasing) on dense
    weights with a residual. Its autograd is the Function's, so the inputs need no gradient."""
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    fwd = torch.ops.compacter_kernels.triton_adapter_fwd.default
    x, wd, bd, wu, bu = dense_inputs(lead=(5,), d=32, k=16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    torch.library.opcheck(fwd, (x, torch.randn_like(x), None, wd, None, bd, None, wu, None, bu, None, "relu", 1.0,
                                torch.float32, False))


# ---- the generic op checks (tests/op_checks.py) ---------------------------------------------------

class TestOpChecks(op_checks.OpChecks, op_checks.ResidualChecks, op_checks.ZeroFeatureChecks):
    OP = "adapter"


class TestAutocast(op_checks.AutocastLayerChecks):
    LAYER = "houlsby"


class TestLinearWeightsOpChecks(op_checks.OpChecks, op_checks.ResidualChecks):
    """The same checks of the nn.Linear-weights form, `functional._adapter_linear` (weights
    (out, in), the AdapterHub swap-in's entry)."""

    OP = "adapter_linear"


def test_a_bottleneck_wider_than_the_kernels_runs_as_matmuls(backend):
    op_checks.check_wide_bottleneck(backend, "adapter", tasks=1)


# ---- torch.compile(fullgraph=True) in a fresh process ------------------------------------------

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


# ---- bad input: ValueError / TypeError naming the argument ----------------------------------------

def _adapter_call(backend, **change):
    x, wd, bd, wu, bu = dense_inputs(lead=(3,), d=16, k=8, dtype=F32, device=DEVICE, requires_grad=False)
    kw = dict(x=x, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
    kw.update(change)
    opts = {k: kw.pop(k) for k in ("activation", "scale") if k in kw}
    return lambda: ck.adapter(*kw.values(), backend=backend, **opts)


BAD_INPUTS = [
    (dict(w_down=None), TypeError, "w_down must be a torch.Tensor, got NoneType"),
    (dict(w_up=None), TypeError, "w_up must be a torch.Tensor, got NoneType"),
    (dict(activation=None), ValueError, "activation must be one of .* got None"),
    (dict(scale=-10**400), ValueError, "scale must be a finite real number"),
    (dict(x=torch.randn(3, 512)), ValueError, "x has 512 features, the adapter .* expects 16"),
    (dict(b_up=torch.randn(4, 4)), ValueError, r"b_up must have shape \(16,\)"),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS, ids=[m for *_, m in BAD_INPUTS])
def test_bad_input_is_named_on_every_backend(backend, change, exc, match):
    op_checks.check_bad_input(_adapter_call, backend, change, exc, match)


@reference_only
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


BAD_LAYERS = [
    (lambda: ck.nn.HoulsbyAdapter(0, 4), ValueError, "d_model must be >= 1, got 0"),
    (lambda: ck.nn.HoulsbyAdapter(16, 2.5), TypeError, "bottleneck must be an integer"),
]


@pytest.mark.parametrize("make,exc,match", BAD_LAYERS, ids=[m for *_, m in BAD_LAYERS])
def test_bad_layer_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- the reference: gradcheck in float64 -------------------------------------------------------------

@reference_only
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_adapter(activation, bias):
    x, wd, bd, wu, bu = dense_inputs(lead=(2, 2), d=6, k=3, bias=bias)
    assert torch.autograd.gradcheck(
        lambda *t: ref.adapter(*t, activation=activation, scale=1.5), (x, wd, bd, wu, bu))
