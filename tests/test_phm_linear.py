"""ck.phm_linear (and ck.phm_weight, the H it multiplies by) on every backend: outputs and every
gradient against the reference over shapes, dtypes and biases; the generic op checks
(tests/op_checks.py: odd layouts, second derivatives, torch.func, forward-mode AD, empty widths,
autocast); bad input named; the reference against itself (the Kronecker sum as the paper writes
it, two formulations, gradcheck in float64)."""

import pytest
import torch

import compacter_kernels as ck
import op_checks
from compacter_kernels import reference as ref
from op_checks import (DEVICE, DTYPES, F32, backend, h_build, kernel, kernel_backend, narrow_column_chunks,  # noqa: F401
                       poison_outputs, reference_only, skip_unsupported)
from utils import check_op, kron_loop, phm_factors


# ---- every kernel backend against the reference --------------------------------------------------

@pytest.mark.parametrize("n,I,O,rank", [(4, 48, 24, 1), (2, 20, 36, 4), (4, 16, 40, None), (8, 64, 48, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_phm_linear_matches_reference(kernel_backend, n, I, O, rank, dtype, bias, h_build):
    skip_unsupported(dtype, kernel_backend)
    rule, left, right = phm_factors(n, I, O, rank, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(O, dtype=dtype, device=DEVICE, requires_grad=True) if bias else None
    x = torch.randn(3, 11, I, dtype=dtype, device=DEVICE, requires_grad=True)
    check_op(kernel("phm_linear", kernel_backend), ref.phm_linear, (x, rule, left, right, b), dtype,
             f"phm_linear n={n} {I}->{O} r={rank}")



@pytest.mark.parametrize("n,I,O,rank", [(2, 20, 36, 4), (4, 16, 72, 1), (2, 12, 40, None)])
def test_phm_linear_gradients_in_column_chunks(narrow_column_chunks, n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank, dtype=torch.float32, device=DEVICE, requires_grad=True)
    b = torch.randn(O, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 11, I, device=DEVICE, requires_grad=True)
    check_op(kernel("phm_linear", "triton"), ref.phm_linear, (x, rule, left, right, b), torch.float32,
             f"phm_linear in column chunks n={n} {I}->{O} r={rank}")

def test_opcheck_triton_ops():
    """phm_linear's two triton custom ops (their schemas, fake impls, no aliasing). Their autograd
    is the Function's (tested everywhere else), so the inputs here need no gradient."""
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    x = torch.randn(5, 16, device=DEVICE)
    rule, left, right = phm_factors(4, 16, 24, 2, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.compacter_kernels.triton_phm_linear_fwd.default, (x, rule, left, right, None))
    torch.library.opcheck(torch.ops.compacter_kernels.triton_phm_linear_bwd.default,
                          (torch.randn(5, 24, device=DEVICE), x, rule, left, right, None))


# ---- the generic op checks (tests/op_checks.py) ---------------------------------------------------

class TestOpChecks(op_checks.OpChecks, op_checks.ZeroFeatureChecks):
    OP = "phm_linear"


class TestAutocast(op_checks.AutocastLayerChecks, op_checks.AutocastExactChecks):
    LAYER = "phm_linear"
    OP_NAME = "phm_linear"


# ---- bad input: ValueError / TypeError naming the argument ----------------------------------------

def _phm_weight_call(**change):
    rule, left, right = phm_factors(4, 16, 8, 2, dtype=F32)
    kw = dict(rule=rule, left=left, right=right)
    kw.update(change)
    return lambda: ck.phm_weight(**kw)


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


@reference_only
def test_bad_phm_linear_input_is_named():
    F64 = torch.float64
    rule, left, right = phm_factors(4, 16, 8, 1)
    x = torch.randn(2, 16, dtype=F64)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ck.phm_linear(x, rule, left, right, torch.randn(16, dtype=F64))
    with pytest.raises(ValueError, match="x has 12 features, the projection .* expects 16"):
        ck.phm_linear(x[:, :12], rule, left, right)
    with pytest.raises(ValueError, match=r"x has 16 features, the projection .* expects 8"):
        ck.phm_linear(x, rule, left[:, :2], None)


BAD_LAYERS = [
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=0), ValueError, "phm_dim must be >= 1, got 0"),
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=-4), ValueError, "phm_dim must be >= 1, got -4"),
    (lambda: ck.nn.PHMLinear(16, 8, phm_dim=2.0), TypeError, "phm_dim must be an integer, got float"),
    (lambda: ck.nn.PHMLinear(16, 8, rank=0), ValueError, "rank must be >= 1, got 0"),
    (lambda: ck.nn.PHMRule(0), ValueError, "phm_dim must be >= 1, got 0"),
]


@pytest.mark.parametrize("make,exc,match", BAD_LAYERS, ids=[m for *_, m in BAD_LAYERS])
def test_bad_layer_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- the reference against itself: the Kronecker sum, two formulations, gradcheck in float64 --------

REFERENCE_SHAPES = [  # (n, in_features, out_features, rank); rank None = unfactorised
    (2, 8, 4, 1), (4, 16, 24, 1), (4, 24, 16, 4), (8, 16, 24, 1), (2, 6, 10, None), (4, 8, 12, None),
    (12, 24, 36, 1), (1, 5, 3, 2),
]


@reference_only
@pytest.mark.parametrize("n,I,O,rank", REFERENCE_SHAPES)
def test_phm_weight_is_the_kronecker_sum(n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank)
    H = ref.phm_weight(rule, left, right)
    assert H.shape == (I, O)
    torch.testing.assert_close(H, kron_loop(rule, left, right), atol=0, rtol=1e-12)


@reference_only
def test_phm_weight_elementwise_definition():
    n, I, O = 3, 6, 9
    rule, B, _ = phm_factors(n, I, O, None)
    H = ref.phm_weight(rule, B)
    P, Q = I // n, O // n
    for a, p, c, q in [(0, 0, 0, 0), (2, 1, 1, 2), (1, 0, 2, 1)]:
        expected = sum(rule[i, a, c] * B[i, p, q] for i in range(n))
        torch.testing.assert_close(H[a * P + p, c * Q + q], expected)


@reference_only
def test_factorized_rule():
    left, right = torch.randn(4, 4, 1, dtype=torch.float64), torch.randn(4, 1, 4, dtype=torch.float64)
    A = ref.factorized_rule(left, right)
    torch.testing.assert_close(A[2], left[2] @ right[2])


@reference_only
@pytest.mark.parametrize("n,I,O,rank", REFERENCE_SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("bias", [True, False])
def test_phm_linear_two_formulations_agree(n, I, O, rank, lead, bias):
    rule, left, right = phm_factors(n, I, O, rank)
    x = torch.randn(*lead, I, dtype=torch.float64)
    b = torch.randn(O, dtype=torch.float64) if bias else None
    y = ref.phm_linear(x, rule, left, right, b)
    assert y.shape == (*lead, O)
    torch.testing.assert_close(y, ref.phm_linear_factored(x, rule, left, right, b))
    torch.testing.assert_close(y, x @ kron_loop(rule, left, right) + (0 if b is None else b))


@reference_only
@pytest.mark.parametrize("n,I,O,rank", [(2, 4, 6, 1), (2, 4, 6, 3), (3, 6, 3, None)])
def test_gradcheck_phm_weight(n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank, requires_grad=True)
    assert torch.autograd.gradcheck(ref.phm_weight, (rule, left, right))


@reference_only
@pytest.mark.parametrize("rank", [1, 2, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fn", [ref.phm_linear, ref.phm_linear_factored])
def test_gradcheck_phm_linear(rank, bias, fn):
    rule, left, right = phm_factors(2, 4, 6, rank, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(fn, (x, rule, left, right, b))
