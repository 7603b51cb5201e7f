"""What each benchmark case must move and compute, as pure functions (compacter-math.md).

Only per-row traffic counts: the parameters and their gradients are a few KB (reductions over
M), so they are left out of the floor. ``e`` is the bytes per element of the activations.
"""

from __future__ import annotations

OPS = ("compacter", "houlsby", "phm_linear")
MODES = ("fwd", "bwd", "fwd+bwd")


def _check(op: str, mode: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def floor_bytes(op: str, mode: str, M: int, d: int, k: int, e: int) -> int:
    """The least bytes a kernel can move for this case.

    Adapters (compacter, houlsby; x (M, d), bottleneck k):
        fwd: read x, write y, save z       2*M*d*e + M*k*e
        bwd: read dy, x, z, write dx       3*M*d*e + M*k*e
    phm_linear (the down projection, x (M, I=d) -> y (M, O=k)):
        fwd: read x, write y               (M*I + M*O)*e
        bwd: read dy and x, write dx       (M*O + 2*M*I)*e
    fwd+bwd is the sum of the two.
    """
    _check(op, mode)
    if op == "phm_linear":
        fwd, bwd = (M * d + M * k) * e, (M * k + 2 * M * d) * e
    else:
        fwd, bwd = 2 * M * d * e + M * k * e, 3 * M * d * e + M * k * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flops(op: str, mode: str, M: int, d: int, k: int) -> int:
    """Matmul FLOPs (building H from its factors is O(d*k*n), negligible next to O(M*d*k)).

    Adapters: fwd x @ H_down and g @ H_up: 4*M*d*k; bwd dg, dx, dH_down, dH_up: 8*M*d*k.
    phm_linear: fwd 2*M*d*k; bwd dx and dH: 4*M*d*k.
    """
    _check(op, mode)
    fwd = (2 if op == "phm_linear" else 4) * M * d * k
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def computes(func) -> bool:
    """Whether an op seen by a dispatch mode is an aten op that computes: not a view, not an
    allocation (what a count of kernels launched counts)."""
    name = func._schema.name
    returns = func._schema.returns
    view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return name.startswith("aten::") and not view and name[len("aten::"):] not in _ALLOCATIONS
