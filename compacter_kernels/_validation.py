"""Argument checks shared by every backend: bad input fails here, before any kernel launches.

Each error names the argument, what was seen and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .ops.common import autocast_dtype
from .reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _shape(name: str, t: Optional[Tensor], expected: tuple, meaning: str) -> None:
    if t is not None and t.shape != expected:
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(t.shape)}")


def check_tensors(named: dict, optional: Sequence[str] = ()) -> None:
    """The first tensor of ``named`` is floating; every other one (None only where ``optional``)
    shares its dtype (any floating dtype under autocast) and device."""
    (first, x), *rest = named.items()
    _tensor(first, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{first} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}")
    dtype, device = x.dtype, x.device
    for name, t in rest:
        if not isinstance(t, Tensor):
            if t is None and name in optional:
                continue
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            # Under autocast, mixed dtypes are the norm (fp32 parameters, low-precision activations):
            # the backends cast as autocast would.
            if autocast_dtype(x) is None:
                raise TypeError(f"{name} has dtype {t.dtype} but {first} has {dtype}: cast them to one dtype")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: move them to one device")


def check_x(x) -> None:
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features), got a 0-d tensor")


def check_activation(activation) -> None:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_scale(scale) -> float:
    """scale as the float the kernels take: a finite real number."""
    if type(scale) is float and math.isfinite(scale):  # the common case first (host time)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite real number (a float), got {scale!r}")
    return value


def _width(x: Tensor, expected: int, what: str) -> None:
    """The user's mistake is x when the weights agree among themselves: say so."""
    if x.shape[-1] != expected:
        raise ValueError(f"x has {x.shape[-1]} features, {what} expects {expected}")


def _phm_in_features(rule, left) -> Optional[int]:
    """in_features of a projection's factors, or None when they are malformed (check_phm says how)."""
    if isinstance(rule, Tensor) and isinstance(left, Tensor) and rule.dim() == 3 and left.dim() == 3:
        return rule.shape[0] * left.shape[1]
    return None


def check_phm(suffix: str, rule, left, right, bias, in_features: int, out_features: Optional[int] = None) -> int:
    """Checks one PHM projection's factors (named rule<suffix>, left<suffix>...) against
    ``in_features`` (and ``out_features`` when given); returns out_features."""
    for name, t in ((f"rule{suffix}", rule), (f"left{suffix}", left)):
        _tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
    _tensor(f"right{suffix}", right, optional=True)
    n = rule.shape[0]
    _shape(f"rule{suffix}", rule, (n, n, n), "phm_dim^3")
    if n < 1 or in_features % n:
        raise ValueError(f"in_features={in_features} must be divisible by phm_dim n={n} (from rule{suffix})")
    p = in_features // n
    if right is None:
        if left.shape[0] != n or left.shape[1] != p:
            raise ValueError(
                f"left{suffix} must have shape ({n}, {p}, out_features/{n}) (the full PHM weight B), "
                f"got {tuple(left.shape)}"
            )
        q = left.shape[2]
    else:
        if right.dim() != 3:
            raise ValueError(f"right{suffix} must be 3-D (n, rank, out_features/n), got {tuple(right.shape)}")
        r = left.shape[2]
        _shape(f"left{suffix}", left, (n, p, r), "n, in_features/n, rank")
        q = right.shape[2]
        _shape(f"right{suffix}", right, (n, r, q), "n, rank, out_features/n")
        if r < 1:
            raise ValueError(f"rank must be >= 1, got left{suffix} of shape {tuple(left.shape)}")
    if q < 1:
        raise ValueError(f"out_features/phm_dim must be >= 1, got {q}")
    if out_features is not None and n * q != out_features:
        raise ValueError(f"right{suffix} (or left{suffix}) maps to {n * q} features, expected {out_features} "
                         f"(d_model of x)")
    _shape(f"bias{suffix}", bias, (n * q,), "out_features")
    return n * q


def check_phm_weight(rule, left, right) -> None:
    check_tensors({"rule": rule, "left": left, "right": right}, optional=("right",))
    in_features = _phm_in_features(rule, left)
    check_phm("", rule, left, right, None, 0 if in_features is None else in_features)


def check_phm_linear(x, rule, left, right, bias) -> None:
    check_x(x)
    check_tensors({"x": x, "rule": rule, "left": left, "right": right, "bias": bias}, optional=("right", "bias"))
    in_features = _phm_in_features(rule, left)
    if in_features is not None:
        _width(x, in_features, f"the projection (rule {tuple(rule.shape)}, left {tuple(left.shape)})")
    check_phm("", rule, left, right, bias, x.shape[-1])


def check_adapter(x, w_down, b_down, w_up, b_up, activation, scale, residual) -> float:
    """Checks ck.adapter's arguments; returns scale as a float."""
    _check_adapter(x, w_down, b_down, w_up, b_up, residual, activation)
    return check_scale(scale)


def check_adapter_linear(x, weight_down, b_down, weight_up, b_up, activation, scale, residual) -> float:
    """check_adapter on nn.Linear weights (out, in): the checks see their (in, out) transposes."""
    for name, w in (("weight_down", weight_down), ("weight_up", weight_up)):
        _tensor(name, w)
        if w.dim() != 2:
            raise ValueError(f"{name} must be an nn.Linear weight (out_features, in_features), got shape "
                             f"{tuple(w.shape)}")
    k, d = weight_down.shape
    if tuple(weight_up.shape) != (d, k):
        raise ValueError(f"weight_up must have shape ({d}, {k}) (d_model, bottleneck) to match weight_down "
                         f"{tuple(weight_down.shape)} (bottleneck, d_model), got {tuple(weight_up.shape)}")
    _check_adapter(x, weight_down.t(), b_down, weight_up.t(), b_up, residual, activation)  # x, biases, dtypes
    return check_scale(scale)


def _check_adapter(x, w_down, b_down, w_up, b_up, residual, activation) -> None:
    check_x(x)
    check_tensors({"x": x, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "residual": residual},
                  optional=("b_down", "b_up", "residual"))
    check_activation(activation)
    d = x.shape[-1]
    if w_down.dim() == 2 and w_up.dim() == 2 and w_down.shape[0] == w_up.shape[1]:
        _width(x, w_down.shape[0], f"the adapter (w_down {tuple(w_down.shape)}, w_up {tuple(w_up.shape)})")
    if w_down.dim() != 2 or w_down.shape[0] != d:
        raise ValueError(f"w_down must have shape ({d}, bottleneck) (d_model, k), got {tuple(w_down.shape)}")
    k = w_down.shape[1]
    _shape("w_up", w_up, (k, d), "bottleneck, d_model")
    _shape("b_down", b_down, (k,), "bottleneck")
    _shape("b_up", b_up, (d,), "d_model")
    _shape("residual", residual, x.shape, "the shape of x")


def check_compacter_adapter(x, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
                            bias_up, activation, scale, residual) -> float:
    """Checks ck.compacter_adapter's arguments; returns scale as a float."""
    check_x(x)
    check_tensors(
        {
            "x": x, "rule_down": rule_down, "left_down": left_down, "right_down": right_down,
            "bias_down": bias_down, "rule_up": rule_up, "left_up": left_up, "right_up": right_up,
            "bias_up": bias_up, "residual": residual,
        },
        optional=("right_down", "bias_down", "right_up", "bias_up", "residual"),
    )
    check_activation(activation)
    d_in = _phm_in_features(rule_down, left_down)
    up = left_up if right_up is None else right_up
    if d_in is not None and isinstance(up, Tensor) and up.dim() == 3 and isinstance(rule_up, Tensor) \
            and rule_up.dim() == 3 and rule_up.shape[0] * up.shape[2] == d_in:
        _width(x, d_in, "the adapter (from left_down and the up projection)")
    d = x.shape[-1]
    k = check_phm("_down", rule_down, left_down, right_down, bias_down, d)
    check_phm("_up", rule_up, left_up, right_up, bias_up, k, out_features=d)
    _shape("residual", residual, x.shape, "the shape of x")
    return check_scale(scale)


# ---- mixed-task batches ------------------------------------------------------------------------

def check_task_ids(task_ids, x: Tensor, num_tasks: int) -> Tensor:
    """An integer tensor (any integer dtype) on x's device that broadcasts to x.shape[:-1], every
    id in [0, T); returns it as int64. The range check reads the smallest and largest id back to
    the host, in eager mode only: it is skipped while torch.compile traces and while a CUDA graph
    is captured (where an id out of range is the caller's to rule out)."""
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"task_ids must be an integer torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
        raise TypeError(f"task_ids must be an integer tensor (torch.long, int32, ...), got {task_ids.dtype}")
    if task_ids.device != x.device:
        raise ValueError(f"task_ids is on {task_ids.device} but x is on {x.device}: move them to one device")
    rows = tuple(x.shape[:-1])
    try:
        ok = torch.broadcast_shapes(task_ids.shape, rows) == rows
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"task_ids of shape {tuple(task_ids.shape)} must broadcast to x.shape[:-1] = {rows} "
                         "(one id per row, or per sequence as (batch, 1))")
    if task_ids.dtype in _UNSIGNED:  # few ops take them; ids >= 2**63 become negative and fail the range check
        task_ids = task_ids.view(torch.int64) if task_ids.dtype == torch.uint64 else task_ids.to(torch.int64)
    else:
        task_ids = task_ids.long()
    if task_ids.numel() and not torch.compiler.is_compiling() and not _capturing(x):
        lo_hi = torch.stack(torch.aminmax(task_ids.reshape(-1)))
        try:
            lo, hi = lo_hi.tolist()  # one read back
        except RuntimeError:  # torch 2.6 inside torch.func transforms: no tolist() of their wrapped tensors
            lo, hi = lo_hi[0].item(), lo_hi[1].item()
        if lo < 0 or hi >= num_tasks:
            raise ValueError(f"task_ids must be in [0, {num_tasks}) (num_tasks from the stacked parameters), "
                             f"got ids from {lo} to {hi}")
    return task_ids


_UNSIGNED = tuple(getattr(torch, f"uint{b}") for b in (16, 32, 64) if hasattr(torch, f"uint{b}"))


def _capturing(x: Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stacked(named: dict, T: int) -> None:
    """Each tensor given has the task dimension T first."""
    for name, t in named.items():
        _tensor(name, t, optional=True)
        if t is not None and (t.dim() < 1 or t.shape[0] != T):
            raise ValueError(f"{name} must have the task dimension first, ({T}, ...) as the other stacked "
                             f"parameters, got shape {tuple(t.shape)}")


def _per_task_checks(check, *args) -> None:
    try:
        check(*args)
    except (ValueError, TypeError) as e:
        raise type(e)(f"per task (each stacked parameter's slice [t]): {e}") from None


def check_multitask_compacter_adapter(x, task_ids, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                      right_up, bias_up, activation, scale, residual) -> tuple[float, Tensor]:
    """Checks ck.multitask_compacter_adapter's arguments; returns (scale as a float, task_ids as int64)."""
    check_x(x)
    _tensor("left_down", left_down)
    if left_down.dim() != 4:
        raise ValueError(f"left_down must be 4-D, (T, n, d/n, rank) or (T, n, d/n, k/n), got shape "
                         f"{tuple(left_down.shape)}")
    T = left_down.shape[0]
    stacked = {"left_down": left_down, "right_down": right_down, "bias_down": bias_down, "left_up": left_up,
               "right_up": right_up, "bias_up": bias_up}
    for name, rule in (("rule_down", rule_down), ("rule_up", rule_up)):
        _tensor(name, rule)
        if rule.dim() == 4:
            stacked[name] = rule
        elif rule.dim() != 3:
            raise ValueError(f"{name} must be (n, n, n), shared by the tasks, or (T, n, n, n), got shape "
                             f"{tuple(rule.shape)}")
    _stacked(stacked, T)
    if T < 1:
        raise ValueError("the stacked parameters have no task (T = 0)")
    def first(t, stacked=True):
        return None if t is None else t[0] if stacked else t

    _per_task_checks(check_compacter_adapter, x, first(rule_down, rule_down.dim() == 4), left_down[0],
                     first(right_down), first(bias_down), first(rule_up, rule_up.dim() == 4), left_up[0],
                     first(right_up), first(bias_up), activation, scale, residual)
    return check_scale(scale), check_task_ids(task_ids, x, T)


def check_multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, activation, scale,
                            residual) -> tuple[float, Tensor]:
    """Checks ck.multitask_adapter's arguments; returns (scale as a float, task_ids as int64)."""
    check_x(x)
    _tensor("w_down", w_down)
    if w_down.dim() != 3:
        raise ValueError(f"w_down must be 3-D, (T, d_model, bottleneck), got shape {tuple(w_down.shape)}")
    T = w_down.shape[0]
    _stacked({"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up}, T)
    if T < 1:
        raise ValueError("the stacked parameters have no task (T = 0)")
    _per_task_checks(check_adapter, x, w_down[0], None if b_down is None else b_down[0], w_up[0],
                     None if b_up is None else b_up[0], activation, scale, residual)
    return check_scale(scale), check_task_ids(task_ids, x, T)
