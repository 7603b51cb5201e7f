"""The public functional API: check the arguments, pick a backend, run its op.

Same names and signatures as :mod:`compacter_kernels.reference`, plus ``backend``. The kernel
backends' ops are autograd Functions on 2-D activations (`_fused_adapter`, `_fused_phm_linear`).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _validation, reference
from .backends import FUNCTIONS, select
from .ops.common import (Projection, adapter_math, autocast_dtype, autocast_inputs, needs_math, out_features,
                         phm_linear_math, rows, wants_grad)
from .ops.triton.config import fused_fits


def _fused_adapter(backend: str, x: Tensor, down: Projection, up: Projection, activation: str, scale: float,
                   residual: Optional[Tensor], task_ids: Optional[Tensor] = None) -> Tensor:
    """A kernel backend's fused adapter on x of any leading dims, the arguments checked. Under
    autocast as the eager reference: matmuls in the autocast dtype (only x is cast; `autocast_inputs`)
    and y promoted as eager promotes it. Differentiable torch ops (`adapter_math`) instead where a
    kernel cannot serve: torch.func transforms and forward-mode AD (`needs_math`), no width to
    launch over (d = 0 or k = 0), a bottleneck too wide for the Triton kernels (`fused_fits`),
    and the cuda backend's mixed-task batches (no grouped kernel)."""
    shape = x.shape
    x, residual, out_dtype = autocast_inputs(x, residual, up.bias)
    if residual is x:  # the same function; torch.compile takes no tensor passed twice to a Function
        residual = None
    x2, r2 = rows(x), None if residual is None else rows(residual)
    ids = None if task_ids is None else task_ids.expand(shape[:-1]).reshape(-1).contiguous()
    if ids is not None and down.left.shape[0] == 1:  # one task: the single-task op, no grouping
        down, up, ids = _first_task(down), _first_task(up), None
    down, up = down.packed(backend == "triton"), up.packed(backend == "triton")
    k = out_features(down)
    if (needs_math(x) or x2.shape[1] == 0 or k == 0 or (backend == "triton" and not fused_fits(k))
            or (ids is not None and backend != "triton")):
        y = adapter_math(x2, r2, down, up, activation, scale, out_dtype, ids)
    else:
        store_z = wants_grad(x, residual, (*down, *up))  # without a gradient to come, z is not written
        shared_rule = down.rule is not None and down.rule is up.rule  # passed once (see ops.common)
        y = FUNCTIONS[backend]["adapter"].apply(x2, r2, *down, None if shared_rule else up.rule, up.left, up.right,
                                                up.bias, ids, activation, scale, out_dtype, store_z, shared_rule)
    return y if y.shape == shape else y.reshape(shape)


def _first_task(p: Projection) -> Projection:
    """Task 0's projection of a stacked one (a rule of three dimensions is the tasks' shared one)."""
    return Projection(p.rule if p.rule is None or p.rule.dim() == 3 else p.rule[0], p.left[0],
                      None if p.right is None else p.right[0], None if p.bias is None else p.bias[0])


def _fused_phm_linear(backend: str, x: Tensor, p: Projection) -> Tensor:
    """A kernel backend's phm_linear on x of any leading dims. Under autocast as eager: the matmul
    in the autocast dtype, the bias added after, promoting (an fp32 bias gives an fp32 y); only
    x is cast: H is summed in fp32 from the factors as they are and rounded once."""
    amp = autocast_dtype(x)
    bias = p.bias
    if amp is not None:
        x, p = x.to(amp), p._replace(bias=None)
    x2, p = rows(x), p.packed(backend == "triton")
    if needs_math(x) or x2.shape[1] == 0:
        y = phm_linear_math(x2, p)
    else:
        y = FUNCTIONS[backend]["phm_linear"].apply(x2, *p)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if amp is not None and bias is not None else y


def phm_weight(rule: Tensor, left: Tensor, right: Optional[Tensor] = None) -> Tensor:
    """H = sum_i kron(rule[i], left[i] @ right[i]) (I, O); right None: left is the full B (n, I/n, O/n)."""
    _validation.check_phm_weight(rule, left, right)
    return reference.phm_weight(rule, left, right)


def phm_linear(
    x: Tensor,
    rule: Tensor,
    left: Tensor,
    right: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """y = x @ H + bias with H = sum_i kron(rule[i], left[i] @ right[i]) (I, O)."""
    _validation.check_phm_linear(x, rule, left, right, bias)
    name = select(backend, x)
    if name == "reference":
        return reference.phm_linear(x, rule, left, right, bias)
    return _fused_phm_linear(name, x, Projection(rule, left, right, bias))


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
    backend: str = "auto",
) -> Tensor:
    """y = r + scale * (act(x @ H_down + bias_down) @ H_up + bias_up), r = residual or x."""
    scale = _validation.check_compacter_adapter(x, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                                right_up, bias_up, activation, scale, residual)
    down = Projection(rule_down, left_down, right_down, bias_down)
    up = Projection(rule_up, left_up, right_up, bias_up)
    name = select(backend, x)
    if name == "reference":
        return reference.compacter_adapter(x, *down, *up, activation=activation, scale=scale, residual=residual)
    return _fused_adapter(name, x, down, up, activation, scale, residual)


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
    backend: str = "auto",
) -> Tensor:
    """Dense (Houlsby) adapter: r + scale * (act(x @ w_down + b_down) @ w_up + b_up)."""
    scale = _validation.check_adapter(x, w_down, b_down, w_up, b_up, activation, scale, residual)
    name = select(backend, x)
    if name == "reference":
        return reference.adapter(x, w_down, b_down, w_up, b_up, activation=activation, scale=scale, residual=residual)
    return _fused_adapter(name, x, Projection(None, w_down, None, b_down), Projection(None, w_up, None, b_up),
                          activation, scale, residual)


def _adapter_linear(x: Tensor, weight_down: Tensor, b_down: Optional[Tensor], weight_up: Tensor,
                    b_up: Optional[Tensor], *, activation: str, scale: float, residual: Optional[Tensor],
                    backend: str) -> Tensor:
    """`adapter` on nn.Linear weights (out, in), as AdapterHub's layers hold them: their .t()
    views, which the triton kernels read as they are (no copy)."""
    scale = _validation.check_adapter_linear(x, weight_down, b_down, weight_up, b_up, activation, scale, residual)
    w_down, w_up = weight_down.t(), weight_up.t()
    name = select(backend, x)
    if name == "reference":
        return reference.adapter(x, w_down, b_down, w_up, b_up, activation=activation, scale=scale, residual=residual)
    return _fused_adapter(name, x, Projection(None, w_down, None, b_down), Projection(None, w_up, None, b_up),
                          activation, scale, residual)


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
    backend: str = "auto",
) -> Tensor:
    """Row i through task ``task_ids[i]``'s Compacter adapter: the factors carry a leading task
    dimension T (``left_down (T, n, d/n, r)``, ``right_down (T, n, r, k/n)``, ``bias_down (T, k)``,
    likewise up; ``right_* = None``: the PHM-Adapter's full ``(T, n, d/n, k/n)``), each rule shared
    ``(n, n, n)`` or per task ``(T, n, n, n)``; ``task_ids`` an integer tensor that broadcasts to
    ``x.shape[:-1]`` (per token, or ``(batch, 1)`` per sequence). Runs the backend's fused
    ``x.shape[:-1]`` (per token, or ``(batch, 1)`` per sequence; any integer dtype). The triton
    backend runs every task in the single-task op's launches (the rows grouped by task on the
    device); the reference and cuda backends compute every task's projections of every row in
    one matmul each and pick each row's own (T times the work). No value is read back to the
    host but by the id range check, which is skipped under torch.compile and CUDA-graph capture."""
    scale, task_ids = _validation.check_multitask_compacter_adapter(x, task_ids, rule_down, left_down, right_down,
                                                                    bias_down, rule_up, left_up, right_up, bias_up,
                                                                    activation, scale, residual)
    down = Projection(rule_down, left_down, right_down, bias_down)
    up = Projection(rule_up, left_up, right_up, bias_up)
    name = select(backend, x)
    if name == "reference":
        return reference.multitask_compacter_adapter(x, task_ids, *down, *up, activation=activation, scale=scale,
                                                     residual=residual)
    return _fused_adapter(name, x, down, up, activation, scale, residual, task_ids)


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
    backend: str = "auto",
) -> Tensor:
    """Row i through task ``task_ids[i]``'s dense adapter: ``w_down (T, d, k)``, ``b_down (T, k)``,
    ``w_up (T, k, d)``, ``b_up (T, d)`` (see `multitask_compacter_adapter`)."""
    scale, task_ids = _validation.check_multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, activation, scale,
                                                          residual)
    name = select(backend, x)
    if name == "reference":
        return reference.multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, activation=activation, scale=scale,
                                           residual=residual)
    return _fused_adapter(name, x, Projection(None, w_down, None, b_down), Projection(None, w_up, None, b_up),
                          activation, scale, residual, task_ids)
