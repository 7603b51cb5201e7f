"""Drop-in layers: PHMLinear, CompacterAdapter, HoulsbyAdapter, and the shared PHMRule.

Parameter names and shapes follow the original Compacter code and AdapterHub's ``PHMLayer``
(``phm_rule (n,n,n)``, ``W_left (n, I/n, r)``, ``W_right (n, r, O/n)``, ``W (n, I/n, O/n)``,
``b``), so their weights load without reshaping.

Sharing a rule: build one ``PHMRule``, register it once on your model (``model.phm_rule = rule``)
and pass it as ``rule=`` to every layer. The layers keep an unregistered reference to it, so
it is counted once in ``parameters()`` and ``state_dict()``, wherever it is used.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import check_activation, check_scale
from .reference import factorized_rule, glorot_uniform_

PHM_INIT_RANGE = 1e-4  # std of the rule's normal init in the paper's code (phm_init_range)
HOULSBY_INIT_STD = 1e-2  # near-identity init of Houlsby et al.


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_divisible(name: str, value: int, n: int) -> None:
    _check_int(name, value)
    if value % n:
        raise ValueError(f"{name}={value} must be a positive multiple of phm_dim={n}")


class PHMRule(nn.Module):
    """The shared "slow" weights A: ``phm_rule (n, n, n)``.

    With ``factorized=True`` it is ``phm_rule_left (n, n, 1) @ phm_rule_right (n, 1, n)``, as the
    paper's ``factorized_phm_rule`` option. Calling the module returns the (n, n, n) rule.
    """

    def __init__(self, phm_dim: int = 4, factorized: bool = False, init_range: float = PHM_INIT_RANGE):
        super().__init__()
        _check_int("phm_dim", phm_dim)
        self.phm_dim = phm_dim
        self.factorized = factorized
        n = phm_dim
        if factorized:
            self.phm_rule_left = nn.Parameter(torch.empty(n, n, 1).normal_(0.0, init_range))
            self.phm_rule_right = nn.Parameter(torch.empty(n, 1, n).normal_(0.0, init_range))
        else:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n).normal_(0.0, init_range))

    def forward(self) -> Tensor:
        return factorized_rule(self.phm_rule_left, self.phm_rule_right) if self.factorized else self.phm_rule

    def extra_repr(self) -> str:
        return f"phm_dim={self.phm_dim}, factorized={self.factorized}"


class PHMLinear(nn.Module):
    """y = x @ H + b, H = sum_i kron(A_i, W_left_i @ W_right_i) (in_features, out_features).

    ``rule=None`` gives the layer its own ``phm_rule`` parameter; a ``PHMRule`` shares one.
    ``factorized=False`` keeps the full per-slice weight ``W (n, I/n, O/n)`` (PHM-Adapter).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_dim: int = 4,
        rank: int = 1,
        factorized: bool = True,
        bias: bool = True,
        rule: Optional[PHMRule] = None,
        backend: str = "auto",
    ):
        super().__init__()
        n = phm_dim
        _check_int("phm_dim", n)
        _check_divisible("in_features", in_features, n)
        _check_divisible("out_features", out_features, n)
        _check_int("rank", rank)
        if rule is not None and not isinstance(rule, PHMRule):
            raise TypeError(f"rule must be a compacter_kernels.nn.PHMRule or None, got {type(rule).__name__}")
        if rule is not None and rule.phm_dim != n:
            raise ValueError(f"the shared rule has phm_dim={rule.phm_dim} but this layer has phm_dim={n}")
        self.in_features, self.out_features = in_features, out_features
        self.phm_dim, self.rank, self.factorized = n, rank, factorized
        self.backend = backend
        # Not registered as a submodule: the owner registers a shared rule once (see module doc).
        object.__setattr__(self, "shared_rule", rule)
        if rule is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n))
        if factorized:
            self.W_left = nn.Parameter(torch.empty(n, in_features // n, rank))
            self.W_right = nn.Parameter(torch.empty(n, rank, out_features // n))
        else:
            self.W = nn.Parameter(torch.empty(n, in_features // n, out_features // n))
        self.b = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.shared_rule is None:
            nn.init.normal_(self.phm_rule, 0.0, PHM_INIT_RANGE)
        for w in (self.W_left, self.W_right) if self.factorized else (self.W,):
            glorot_uniform_(w)
        if self.b is not None:
            nn.init.zeros_(self.b)

    def rule(self) -> Tensor:
        return self.phm_rule if self.shared_rule is None else self.shared_rule()

    def factors(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(rule, left, right): the arguments of ck.phm_weight / ck.phm_linear."""
        if self.factorized:
            return self.rule(), self.W_left, self.W_right
        return self.rule(), self.W, None

    def weight(self) -> Tensor:
        """The dense H (in_features, out_features), for inspection or export."""
        return F.phm_weight(*self.factors())

    def forward(self, x: Tensor) -> Tensor:
        return F.phm_linear(x, *self.factors(), self.b, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}, "
                f"rank={self.rank}, factorized={self.factorized}, bias={self.b is not None}, "
                f"shared_rule={self.shared_rule is not None}")


def _bottleneck(d_model: int, reduction_factor: Optional[float], bottleneck: Optional[int]) -> int:
    _check_int("d_model", d_model)
    if bottleneck is None:
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, numbers.Real):
            raise TypeError(f"reduction_factor must be a real number, got {type(reduction_factor).__name__}")
        if not math.isfinite(reduction_factor) or reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be a finite number > 0, got {reduction_factor}")
        bottleneck = int(d_model // reduction_factor)
        if bottleneck < 1:
            raise ValueError(f"d_model={d_model} // reduction_factor={reduction_factor} gives a bottleneck of "
                             f"{bottleneck}: it must be >= 1")
    _check_int("bottleneck", bottleneck)
    return bottleneck


class CompacterAdapter(nn.Module):
    """Compacter bottleneck adapter: y = r + scale * (act(x @ H_down + b) @ H_up + b), r = x.

    The bottleneck is ``bottleneck`` or ``d_model // reduction_factor`` (the paper: 32).
    One rule serves both projections: the ``rule`` given (shared across the model), or one
    this adapter owns (registered here as ``phm_rule``).
    """

    def __init__(
        self,
        d_model: int,
        reduction_factor: Optional[float] = 32,
        bottleneck: Optional[int] = None,
        phm_dim: int = 4,
        rank: int = 1,
        activation: str = "gelu",
        rule: Optional[PHMRule] = None,
        backend: str = "auto",
        factorized: bool = True,
        scale: float = 1.0,
    ):
        super().__init__()
        check_activation(activation)
        check_scale(scale)
        k = _bottleneck(d_model, reduction_factor, bottleneck)
        _check_int("phm_dim", phm_dim)
        _check_divisible("d_model", d_model, phm_dim)
        _check_divisible("the bottleneck", k, phm_dim)
        if rule is None:
            rule = self.phm_rule = PHMRule(phm_dim)
        self.d_model, self.bottleneck, self.activation, self.scale = d_model, k, activation, scale
        self.backend = backend
        self.down = PHMLinear(d_model, k, phm_dim, rank, factorized, True, rule, backend)
        self.up = PHMLinear(k, d_model, phm_dim, rank, factorized, True, rule, backend)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        rule_down, left_down, right_down = self.down.factors()
        rule_up, left_up, right_up = self.up.factors()
        return F.compacter_adapter(
            x, rule_down, left_down, right_down, self.down.b, rule_up, left_up, right_up, self.up.b,
            activation=self.activation, scale=self.scale, residual=residual, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"


class HoulsbyAdapter(nn.Module):
    """Dense bottleneck adapter (Houlsby et al.): y = r + scale * (act(x @ w_down + b_down) @ w_up + b_up).

    ``w_down`` is (d_model, bottleneck) and ``w_up`` (bottleneck, d_model): the transposes of
    ``nn.Linear.weight``. Initialised near identity (small normal weights, zero biases).
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu", backend: str = "auto",
                 scale: float = 1.0):
        super().__init__()
        check_activation(activation)
        check_scale(scale)
        _check_int("d_model", d_model)
        _check_int("bottleneck", bottleneck)
        self.d_model, self.bottleneck, self.activation, self.scale = d_model, bottleneck, activation, scale
        self.backend = backend
        self.w_down = nn.Parameter(torch.empty(d_model, bottleneck))
        self.b_down = nn.Parameter(torch.empty(bottleneck))
        self.w_up = nn.Parameter(torch.empty(bottleneck, d_model))
        self.b_up = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_down, self.w_up):
            nn.init.trunc_normal_(w, std=HOULSBY_INIT_STD, a=-2 * HOULSBY_INIT_STD, b=2 * HOULSBY_INIT_STD)
        nn.init.zeros_(self.b_down)
        nn.init.zeros_(self.b_up)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return F.adapter(x, self.w_down, self.b_down, self.w_up, self.b_up, activation=self.activation,
                         scale=self.scale, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"
