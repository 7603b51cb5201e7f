"""The public functional API: validate, pick a backend, run it.

Same names and signatures as :mod:`compacter_kernels.reference`, plus ``backend``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from torch import Tensor

from . import _validation, reference
from .backends import select
from .ops.autograd import autocast_dtype, plannable

# A repeated fused-adapter call's route, fixed by its arguments' signature (`_plan_key`) after a
# call with that signature has passed the checks: the backend entry point's ``plan``, or False
# where it has none. Skips the checks, the backend's choice and the entry point's layers (host
# time). Bounded; thread-safe enough (a race only plans twice).
_PLANS: dict = {}
_PLANS_MAX = 4096


def _plan_key(what: tuple, x, residual, params) -> Optional[tuple]:
    """Everything the checks, the backend's choice and a plan read of a call: each tensor's shape,
    strides, dtype and device, the autocast state and ``what`` (op, backend, activation); None
    where the call is not plannable (tensor subclasses, torch.compile, transforms, a non-tensor)."""
    if not plannable(x):
        return None
    key = [what, autocast_dtype(x), x.shape, x.stride(), x.dtype, x.device]
    for t in (residual, *params):
        if t is None:
            key.append(None)
        elif isinstance(t, Tensor):
            key.append((t.shape, t.stride(), t.dtype, t.device))
        else:  # the checks say what is wrong
            return None
    return tuple(key)


def _planned(what: tuple, x: Tensor, residual: Optional[Tensor], params: tuple, scale, checked: Callable) -> Tensor:
    """A fused adapter call: by its signature's plan where there is one, else ``checked()`` ->
    (y, the backend entry point that ran), the checks included, whose plan is then kept.
    ``params``: (rule, left, right, bias) down then up, as the entry point takes them."""
    key = _plan_key(what, x, residual, params)
    if key is not None:
        try:
            call = _PLANS.get(key)
        except TypeError:  # an activation that is not a string: the checks say what is wrong
            key = call = None
        if call and type(scale) is float and math.isfinite(scale):
            return call(x, residual, params, scale)
    y, entry = checked()
    if key is not None and key not in _PLANS:
        plan = getattr(entry, "plan", None)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = (plan is not None and plan(x, residual, params, what[2])) or False
    return y


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
    return select("phm_linear", backend, x)(x, rule, left, right, bias)


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
    params = (rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up)

    def checked():
        s = _validation.check_compacter_adapter(x, *params, activation, scale, residual)
        impl = select("compacter_adapter", backend, x)
        return impl(x, *params, activation=activation, scale=s, residual=residual), impl

    return _planned(("compacter_adapter", backend, activation), x, residual, params, scale, checked)


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

    def checked():
        s = _validation.check_adapter(x, w_down, b_down, w_up, b_up, activation, scale, residual)
        impl = select("adapter", backend, x)
        return impl(x, w_down, b_down, w_up, b_up, activation=activation, scale=s, residual=residual), impl

    return _planned(("adapter", backend, activation), x, residual, (None, w_down, None, b_down, None, w_up, None, b_up),
                    scale, checked)


def _adapter_linear(x: Tensor, weight_down: Tensor, b_down: Optional[Tensor], weight_up: Tensor,
                    b_up: Optional[Tensor], *, activation: str, scale: float, residual: Optional[Tensor],
                    backend: str) -> Tensor:
    """`adapter` on nn.Linear weights (out, in), as AdapterHub's layers hold them: the same as
    ``adapter(x, weight_down.t(), b_down, weight_up.t(), b_up, ...)``, without the two transposes
    autograd would record and run back, where the backend takes the weights as they are
    (``impl.linear``; host time)."""

    def checked():
        s = _validation.check_adapter_linear(x, weight_down, b_down, weight_up, b_up, activation, scale, residual)
        impl = select("adapter", backend, x)
        linear = getattr(impl, "linear", None)
        if linear is None:  # no plan: the entry point takes the transposes
            return impl(x, weight_down.t(), b_down, weight_up.t(), b_up, activation=activation, scale=s,
                        residual=residual), None
        return linear(x, weight_down, b_down, weight_up, b_up, activation=activation, scale=s,
                      residual=residual), linear

    return _planned(("adapter_linear", backend, activation), x, residual,
                    (None, weight_down, None, b_down, None, weight_up, None, b_up), scale, checked)


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
    single-task op once per task present (rows grouped by a stable sort), or, where no gradient is
    wanted (``no_grad``, ``inference_mode``, frozen weights), the triton backend's forward for
    all the tasks in one launch."""
    scale, _ = _validation.check_multitask_compacter_adapter(x, task_ids, rule_down, left_down, right_down,
                                                             bias_down, rule_up, left_up, right_up, bias_up,
                                                             activation, scale, residual)
    impl = select("multitask_compacter_adapter", backend, x)
    return impl(x, task_ids, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
                activation=activation, scale=scale, residual=residual)


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
    scale, _ = _validation.check_multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, activation, scale,
                                                   residual)
    impl = select("multitask_adapter", backend, x)
    return impl(x, task_ids, w_down, b_down, w_up, b_up, activation=activation, scale=scale, residual=residual)
