"""Pure-PyTorch reference: the function every backend must compute.

Readable on purpose: each line maps to ../shared/docs/compacter-math.md. ``H`` is
rebuilt on every call, exactly as the original Compacter code and AdapterHub do,
so this is also the "eager original" the benchmarks compare against.

Layout reminders (the original code's, so checkpoints load without reshaping):
    rule  (n, n, n)        the shared "slow" weights A
    left  (n, I/n, r)      W_left = S   (or the full B (n, I/n, O/n) when right is None)
    right (n, r, O/n)      W_right = T
    H     (I, O)           note: the transpose of nn.Linear.weight
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "identity")


def _identity(z: Tensor) -> Tensor:
    return z


def _gelu_tanh(z: Tensor) -> Tensor:
    return F.gelu(z, approximate="tanh")


_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact erf form (AdapterHub's default for Compacter)
    "gelu_tanh": _gelu_tanh,  # HuggingFace "gelu_new", the original Compacter configs
    "relu": F.relu,
    "silu": F.silu,
    "identity": _identity,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return _ACTIVATION_FNS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}") from None


def factorized_rule(rule_left: Tensor, rule_right: Tensor) -> Tensor:
    """A[i] = rule_left[i] @ rule_right[i]: (n, n, 1) @ (n, 1, n) -> (n, n, n)."""
    return torch.bmm(rule_left, rule_right)


def phm_weight(rule: Tensor, left: Tensor, right: Optional[Tensor] = None) -> Tensor:
    """H = sum_i kron(rule[i], B[i]) with B[i] = left[i] @ right[i] (or left[i]): (I, O)."""
    B = left if right is None else torch.bmm(left, right)  # (n, I/n, O/n)
    n, p, q = B.shape
    # Batched Kronecker product, then the sum over i (the original code's formulation):
    # kron(A, B)[a*p + i, c*q + j] = A[a, c] * B[i, j].
    kron = rule[:, :, None, :, None] * B[:, None, :, None, :]  # (n, n, p, n, q)
    return kron.sum(0).reshape(n * p, n * q)


def phm_linear(
    x: Tensor, rule: Tensor, left: Tensor, right: Optional[Tensor] = None, bias: Optional[Tensor] = None
) -> Tensor:
    """y = x @ H + bias, over any leading dimensions of x."""
    y = x @ phm_weight(rule, left, right)
    return y if bias is None else y + bias


def phm_linear_factored(
    x: Tensor, rule: Tensor, left: Tensor, right: Optional[Tensor] = None, bias: Optional[Tensor] = None
) -> Tensor:
    """The same function as :func:`phm_linear`, never building H.

    A row of x viewed as X (n, I/n) maps to ``sum_i (A[i]^T X S[i]) T[i]`` viewed as (n, O/n)
    (with B[i] in place of S[i] T[i] when unfactorised). An independent formulation that the
    tests hold equal to the first, so the reference itself is checked.
    """
    n = rule.shape[0]
    X = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)  # (..., a, p)
    XS = torch.einsum("...ap,ipr->...iar", X, left)  # X S[i] (or X B[i])
    AXS = torch.einsum("iac,...iar->...icr", rule, XS)  # A[i]^T X S[i]
    Y = AXS.sum(-3) if right is None else torch.einsum("...icr,irq->...cq", AXS, right)
    y = Y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Dense (Houlsby) bottleneck adapter: r + scale * (act(x @ w_down + b_down) @ w_up + b_up).

    ``w_down`` is (d, k), ``w_up`` is (k, d); ``residual`` defaults to ``x``.
    """
    z = x @ w_down
    if b_down is not None:
        z = z + b_down
    u = activation_fn(activation)(z) @ w_up
    if b_up is not None:
        u = u + b_up
    return (x if residual is None else residual) + scale * u


def compacter_adapter(
    x: Tensor,
    rule_down: Tensor,
    left_down: Tensor,
    right_down: Optional[Tensor],
    bias_down: Optional[Tensor],
    rule_up: Tensor,
    left_up: Tensor,
    right_up: Optional[Tensor],
    bias_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Compacter adapter: the dense adapter with H_down, H_up built from Kronecker sums.

    The same tensor may be passed as ``rule_down`` and ``rule_up`` (the paper's shared rule);
    autograd then adds the gradients of both projections into it.
    """
    return adapter(
        x,
        phm_weight(rule_down, left_down, right_down),
        bias_down,
        phm_weight(rule_up, left_up, right_up),
        bias_up,
        activation=activation,
        scale=scale,
        residual=residual,
    )


def compacter_adapter_factored(
    x: Tensor,
    rule_down: Tensor,
    left_down: Tensor,
    right_down: Optional[Tensor],
    bias_down: Optional[Tensor],
    rule_up: Tensor,
    left_up: Tensor,
    right_up: Optional[Tensor],
    bias_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """:func:`compacter_adapter` through :func:`phm_linear_factored` (never builds H)."""
    z = phm_linear_factored(x, rule_down, left_down, right_down, bias_down)
    u = phm_linear_factored(activation_fn(activation)(z), rule_up, left_up, right_up, bias_up)
    return (x if residual is None else residual) + scale * u


def glorot_uniform_(t: Tensor) -> Tensor:
    """Glorot-uniform per slice t[i] (fan_in, fan_out of the 2-D slice), as the paper's code."""
    fan_in, fan_out = t.shape[-2], t.shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return t.uniform_(-bound, bound)
