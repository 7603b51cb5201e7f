"""Pure-PyTorch reference: the function every backend must compute.

Readable on purpose: each line is a line of the math (H = sum_i kron(A_i, S_i T_i), the
bottleneck adapter of Houlsby et al. with it as its weights). ``H`` is
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
    # unsqueeze, not rule[:, :, None, :, None]: torch 2.6 records each full slice, a slice_backward kernel each.
    kron = rule.unsqueeze(2).unsqueeze(4) * B.unsqueeze(1).unsqueeze(3)  # (n, n, p, n, q)
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


# ---- mixed-task batches: T tasks' adapters, one per row ----------------------------------------

def task_matmul(a: Tensor, w: Tensor, task_ids: Tensor) -> Tensor:
    """Row i of a (M, I) times w[task_ids[i]] of the stacked w (T, I, O), with no value read back
    to the host (so torch.compile and CUDA graphs take it whole): every task's product of every
    row in one matmul, T times the work of one, then each row's own picked. Narrowing (O <= I):
    the (M, T, O) products and a gather; widening: each row placed in its task's block of a
    (M, T * I) matrix, zeros elsewhere, times all the w's stacked."""
    T, I, O = w.shape
    M = a.shape[0]
    if O <= I:
        out = (a @ w.transpose(0, 1).reshape(I, T * O)).view(M, T, O)
        return out.gather(1, task_ids.view(M, 1, 1).expand(M, 1, O)).squeeze(1)
    one_hot = (task_ids.view(M, 1) == torch.arange(T, device=a.device)).to(a.dtype)
    return (one_hot.unsqueeze(2) * a.unsqueeze(1)).reshape(M, T * I) @ w.reshape(T * I, O)


def multitask_adapter(
    x: Tensor,
    task_ids: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Row i through task ``task_ids[i]``'s dense adapter: ``w_down (T, d, k)``, ``b_down (T, k)``,
    ``w_up (T, k, d)``, ``b_up (T, d)``; ``task_ids`` broadcasts to x.shape[:-1]."""
    d = x.shape[-1]
    ids = task_ids.expand(x.shape[:-1]).reshape(-1)
    z = task_matmul(x.reshape(ids.shape[0], d), w_down, ids)
    if b_down is not None:
        z = z + b_down[ids]
    u = task_matmul(activation_fn(activation)(z), w_up, ids)
    if b_up is not None:
        u = u + b_up[ids]
    return (x if residual is None else residual) + scale * u.reshape(x.shape)


def stacked_phm_weight(rule: Tensor, left: Tensor, right: Optional[Tensor]) -> Tensor:
    """Each task's H (T, I, O) of factors stacked per task; a rule of three dimensions is shared."""
    return torch.stack([phm_weight(rule if rule.dim() == 3 else rule[t], left[t], None if right is None else right[t])
                        for t in range(left.shape[0])])


def multitask_compacter_adapter(
    x: Tensor,
    task_ids: Tensor,
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
    """Row i through task ``task_ids[i]``'s Compacter adapter. The factors carry a leading task
    dimension T (``left_down (T, n, d/n, r)``, ``bias_down (T, k)``, ...); each rule is shared,
    (n, n, n), or per task, (T, n, n, n)."""
    return multitask_adapter(x, task_ids, stacked_phm_weight(rule_down, left_down, right_down), bias_down,
                             stacked_phm_weight(rule_up, left_up, right_up), bias_up, activation=activation,
                             scale=scale, residual=residual)
