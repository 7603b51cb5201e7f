"""The reference against itself: two independent formulations, and gradcheck in float64."""

import pytest
import torch

from compacter_kernels import reference as ref
from utils import compacter_inputs, dense_inputs, phm_factors

SHAPES = [  # (n, in_features, out_features, rank); rank None = unfactorised
    (2, 8, 4, 1), (4, 16, 24, 1), (4, 24, 16, 4), (8, 16, 24, 1), (2, 6, 10, None), (4, 8, 12, None),
    (12, 24, 36, 1), (1, 5, 3, 2),
]


def kron_loop(rule, left, right):
    """H as the paper writes it: sum_i kron(A_i, S_i T_i), one torch.kron per slice."""
    B = left if right is None else left @ right
    return sum(torch.kron(rule[i], B[i]) for i in range(rule.shape[0]))


@pytest.mark.parametrize("n,I,O,rank", SHAPES)
def test_phm_weight_is_the_kronecker_sum(n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank)
    H = ref.phm_weight(rule, left, right)
    assert H.shape == (I, O)
    torch.testing.assert_close(H, kron_loop(rule, left, right), atol=0, rtol=1e-12)


def test_phm_weight_elementwise_definition():
    n, I, O = 3, 6, 9
    rule, B, _ = phm_factors(n, I, O, None)
    H = ref.phm_weight(rule, B)
    P, Q = I // n, O // n
    for a, p, c, q in [(0, 0, 0, 0), (2, 1, 1, 2), (1, 0, 2, 1)]:
        expected = sum(rule[i, a, c] * B[i, p, q] for i in range(n))
        torch.testing.assert_close(H[a * P + p, c * Q + q], expected)


def test_factorized_rule():
    left, right = torch.randn(4, 4, 1, dtype=torch.float64), torch.randn(4, 1, 4, dtype=torch.float64)
    A = ref.factorized_rule(left, right)
    torch.testing.assert_close(A[2], left[2] @ right[2])


@pytest.mark.parametrize("n,I,O,rank", SHAPES)
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


def test_compacter_is_the_dense_adapter_with_kron_weights():
    inp = compacter_inputs(d=16, k=8, n=4, rank=2, requires_grad=False)
    r = torch.randn_like(inp.x)
    y = ref.compacter_adapter(*inp.args(), activation="gelu_tanh", scale=2.0, residual=r)
    Hd = kron_loop(inp.rule_down, inp.left_down, inp.right_down)
    Hu = kron_loop(inp.rule_up, inp.left_up, inp.right_up)
    z = inp.x @ Hd + inp.bias_down
    expected = r + 2.0 * (torch.nn.functional.gelu(z, approximate="tanh") @ Hu + inp.bias_up)
    torch.testing.assert_close(y, expected)


def test_activations_match_their_definitions():
    z = torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(ref.activation_fn("gelu")(z), 0.5 * z * (1 + torch.erf(z / 2**0.5)))
    c = (2 / torch.pi) ** 0.5
    torch.testing.assert_close(ref.activation_fn("gelu_tanh")(z), 0.5 * z * (1 + torch.tanh(c * (z + 0.044715 * z**3))))
    torch.testing.assert_close(ref.activation_fn("silu")(z), z * torch.sigmoid(z))
    torch.testing.assert_close(ref.activation_fn("relu")(z), z.clamp_min(0))
    torch.testing.assert_close(ref.activation_fn("identity")(z), z)
    with pytest.raises(ValueError, match="activation"):
        ref.activation_fn("tanh")


# ---- gradcheck in float64 for every variant ---------------------------------------------------

@pytest.mark.parametrize("n,I,O,rank", [(2, 4, 6, 1), (2, 4, 6, 3), (3, 6, 3, None)])
def test_gradcheck_phm_weight(n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank, requires_grad=True)
    assert torch.autograd.gradcheck(ref.phm_weight, (rule, left, right))


@pytest.mark.parametrize("rank", [1, 2, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fn", [ref.phm_linear, ref.phm_linear_factored])
def test_gradcheck_phm_linear(rank, bias, fn):
    rule, left, right = phm_factors(2, 4, 6, rank, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(fn, (x, rule, left, right, b))


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


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_adapter(activation, bias):
    x, wd, bd, wu, bu = dense_inputs(lead=(2, 2), d=6, k=3, bias=bias)
    assert torch.autograd.gradcheck(
        lambda *t: ref.adapter(*t, activation=activation, scale=1.5), (x, wd, bd, wu, bu))


def test_glorot_uniform_bounds_per_slice():
    t = torch.empty(4, 100, 3)
    ref.glorot_uniform_(t)
    bound = (6 / 103) ** 0.5
    assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
