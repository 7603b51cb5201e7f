"""The nn layers: shapes, names, initialisation, shared rule, and equality with the reference."""

import math

import pytest
import torch
from torch import nn

from compacter_kernels import reference as ref
from compacter_kernels.nn import CompacterAdapter, HoulsbyAdapter, PHMLinear, PHMRule


def _original_kronecker_sum(rule, W):
    """H as the paper's code builds it: batched kronecker_product(rule, W).sum(0)."""
    res = rule.unsqueeze(-1).unsqueeze(-3) * W.unsqueeze(-2).unsqueeze(-4)
    n, a, p, c, q = res.shape
    return res.reshape(n, a * p, c * q).sum(0)


@pytest.mark.parametrize("factorized", [True, False])
def test_phm_linear_parameters_follow_the_original_layout(factorized):
    layer = PHMLinear(16, 24, phm_dim=4, rank=2, factorized=factorized)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    expected = {"phm_rule": (4, 4, 4), "b": (24,)}
    expected.update({"W_left": (4, 4, 2), "W_right": (4, 2, 6)} if factorized else {"W": (4, 4, 6)})
    assert shapes == expected


def test_phm_linear_loads_original_weights_and_matches_their_forward():
    n, I, O, r = 4, 16, 8, 1
    original = {  # a state dict as the paper's PHMLinear / AdapterHub's PHMLayer store it
        "phm_rule": torch.randn(n, n, n), "W_left": torch.randn(n, I // n, r),
        "W_right": torch.randn(n, r, O // n), "b": torch.randn(O),
    }
    layer = PHMLinear(I, O, phm_dim=n, rank=r)
    layer.load_state_dict(original)  # strict: same names and shapes, no reshaping
    x = torch.randn(3, 5, I)
    W = torch.bmm(original["W_left"], original["W_right"])
    expected = x @ _original_kronecker_sum(original["phm_rule"], W) + original["b"]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight(), _original_kronecker_sum(original["phm_rule"], W), atol=1e-6, rtol=1e-5)


def test_initialisation_as_the_papers_code():
    torch.manual_seed(0)
    layer = PHMLinear(768, 96, phm_dim=8, rank=1)
    assert layer.phm_rule.std().item() == pytest.approx(1e-4, rel=0.2)
    bound = math.sqrt(6 / (768 // 8 + 1))  # glorot-uniform per slice (I/n, r)
    assert layer.W_left.abs().max() <= bound and layer.W_left.abs().max() > 0.9 * bound
    assert torch.all(layer.b == 0)
    rule = PHMRule(4)
    assert rule().shape == (4, 4, 4) and rule.phm_rule.std().item() == pytest.approx(1e-4, rel=0.3)
    fr = PHMRule(4, factorized=True)
    torch.testing.assert_close(fr(), fr.phm_rule_left @ fr.phm_rule_right)


def test_adapters_start_near_identity():
    x = torch.randn(4, 7, 768)
    for adapter in (CompacterAdapter(768), HoulsbyAdapter(768, 48)):
        y = adapter(x)
        assert y.shape == x.shape
        rel = ((y - x).norm() / x.norm()).item()
        assert 0 < rel < 0.05, (type(adapter).__name__, rel)


def test_compacter_adapter_matches_the_reference_output_and_gradients():
    adapter = CompacterAdapter(64, bottleneck=16, phm_dim=4, rank=2, activation="gelu_tanh", scale=0.5).double()
    # Bring the parameters away from the near-identity init so the check has teeth.
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    y = adapter(x)
    rule = adapter.phm_rule()
    expected = ref.compacter_adapter(
        x, rule, adapter.down.W_left, adapter.down.W_right, adapter.down.b,
        rule, adapter.up.W_left, adapter.up.W_right, adapter.up.b, activation="gelu_tanh", scale=0.5)
    torch.testing.assert_close(y, expected)
    params = [x, *adapter.parameters()]
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(expected, params, dy)):
        torch.testing.assert_close(a, b)


def test_bottleneck_from_reduction_factor_and_bad_sizes():
    assert CompacterAdapter(768).bottleneck == 24  # T5-base with the paper's reduction 32
    assert CompacterAdapter(768, reduction_factor=16, phm_dim=8).bottleneck == 48
    assert CompacterAdapter(768, bottleneck=96).bottleneck == 96
    with pytest.raises(ValueError, match="the bottleneck=24 must be a positive multiple of phm_dim=16"):
        CompacterAdapter(768, phm_dim=16)
    with pytest.raises(ValueError, match="in_features=30 must be a positive multiple of phm_dim=4"):
        PHMLinear(30, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        HoulsbyAdapter(16, 4, activation="tanh")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PHMLinear(8, 8, rank=0)
    with pytest.raises(ValueError, match="shared rule has phm_dim=2"):
        PHMLinear(8, 8, phm_dim=4, rule=PHMRule(2))


class _TinyModel(nn.Module):
    """Three adapters sharing one rule, registered once on the model."""

    def __init__(self, d=32, factorized_rule=False):
        super().__init__()
        self.phm_rule = PHMRule(4, factorized=factorized_rule)
        self.adapters = nn.ModuleList(CompacterAdapter(d, bottleneck=8, rule=self.phm_rule) for _ in range(3))

    def forward(self, x):
        for a in self.adapters:
            x = a(x)
        return x


@pytest.mark.parametrize("factorized_rule", [False, True])
def test_shared_rule_is_counted_once_and_gets_every_gradient(factorized_rule):
    model = _TinyModel(factorized_rule=factorized_rule)
    rule_keys = [k for k in model.state_dict() if "phm_rule" in k]
    assert rule_keys == (["phm_rule.phm_rule_left", "phm_rule.phm_rule_right"] if factorized_rule
                         else ["phm_rule.phm_rule"])
    n_rule = 2 * 4 * 4 if factorized_rule else 4 * 4 * 4
    down = 4 * 8 * 1 + 4 * 1 * 2 + 8   # W_left (4,8,1), W_right (4,1,2), b (8)
    up = 4 * 2 * 1 + 4 * 1 * 8 + 32    # W_left (4,2,1), W_right (4,1,8), b (32)
    assert sum(p.numel() for p in model.parameters()) == n_rule + 3 * (down + up)
    assert len(model.state_dict()) == len(rule_keys) + 3 * 6

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(5, 32)
    model(x).square().sum().backward()
    rule_param = model.phm_rule.phm_rule_left if factorized_rule else model.phm_rule.phm_rule
    # The shared gradient is the sum of every projection's: check against autograd on copies.
    leaves = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    P = dict(zip(names, leaves))
    rule = (ref.factorized_rule(P["phm_rule.phm_rule_left"], P["phm_rule.phm_rule_right"])
            if factorized_rule else P["phm_rule.phm_rule"])
    h = x
    for i in range(3):
        g = lambda s: P[f"adapters.{i}.{s}"]  # noqa: E731
        h = ref.compacter_adapter(h, rule, g("down.W_left"), g("down.W_right"), g("down.b"),
                                  rule, g("up.W_left"), g("up.W_right"), g("up.b"))
    h.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, msg=name)
    assert rule_param.grad.abs().sum() > 0


def test_houlsby_adapter_matches_the_reference_and_backend_kwarg_is_used():
    a = HoulsbyAdapter(32, 8, activation="relu", scale=2.0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(a(x), ref.adapter(x, a.w_down, a.b_down, a.w_up, a.b_up, activation="relu", scale=2.0))
    r = torch.randn(3, 32)
    torch.testing.assert_close(a(x, residual=r), ref.adapter(x, a.w_down, a.b_down, a.w_up, a.b_up,
                                                             activation="relu", scale=2.0, residual=r))
    a.backend = "no-such-backend"
    with pytest.raises(ValueError, match="backend must be"):
        a(x)
