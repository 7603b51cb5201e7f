"""Fused bottleneck adapter on the CUDA extension's kernels: Compacter (PHM weights) and Houlsby.

Import only once ``compacter_kernels._C`` has loaded: ``_extension._register()`` does, since the
registrations below need the C++ ops ``compacter_kernels::cuda_adapter_fwd`` / ``_bwd``
(csrc/ops.cpp; kernels in csrc/adapter_*.cuh).

The kernels take DENSE ``H_down`` (d, k) and ``H_up`` (k, d) in x's dtype. A Compacter
projection's H is built once per call (forward; backward reuses it) by the extension's
``phm_weight`` op in fp32 from fp32 factors, then rounded once to x's dtype: the values the
Triton backend's prebuilt-H mode feeds its matmuls; they are kept for backward. A dense (Houlsby) projection passes its
matrix (cast to x's dtype). Biases are read in x's dtype or in fp32 (autocast). Forward, per
block of rows:

    z = x @ H_down + b_down;  g = act(z);  y = r + scale * (g @ H_up + b_up)   (r = residual or x)

and z (M x k, x's dtype) is saved for backward. Backward, with du = scale * dy:

    dg = du @ H_up^T;   dz = dg * act'(z);   dx = [dy +] dz @ H_down^T   (no dy term with a residual)
    dH_down = x^T @ dz,  db_down = sum_rows dz;   dH_up = g^T @ du,  db_up = sum_rows du
    dH -> (d rule, d W_left, d W_right) by `phm_weight_backward` (H = sum_i kron(A_i, S_i T_i)),
    or dH itself for a dense projection; d residual = dy.

Every reduction over rows is a fixed-order sum of per-split fp32 partials (no atomics): the
gradients are bit-identical from run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import reference
from ..._phm_grad import phm_weight_backward
from ..autograd import ACT_CODE, adapter_entry_points, no_autocast, register_adapter_op, rows

if not hasattr(torch.ops.compacter_kernels, "cuda_adapter_fwd"):
    raise ImportError("compacter_kernels.ops.cuda needs the CUDA extension's ops: it is imported by "
                      "compacter_kernels._extension once compacter_kernels._C has loaded (see "
                      "compacter_kernels.available_backends()['cuda'])")


def dense_h(rule: Optional[Tensor], left: Tensor, right: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """A projection's H (I, O) as a contiguous matrix in ``dtype``: summed in fp32 from the
    factors (the CUDA extension's phm_weight op on CUDA tensors, loaded before this module is
    imported; the reference elsewhere, as in the CPU emulation) and rounded once; a dense
    projection's matrix as it is."""
    if rule is None:
        return left.to(dtype).contiguous()
    rule, left = rule.float().contiguous(), left.float().contiguous()
    right = None if right is None else right.float().contiguous()
    if rule.is_cuda:
        return torch.ops.compacter_kernels.phm_weight(rule, left, right).to(dtype)
    with no_autocast(rule):
        return reference.phm_weight(rule, left, right).to(dtype)


def dh_to_factors(dH: Tensor, rule, left, right):
    """(d rule, d left, d right) from the fp32 dH, each in its parameter's dtype (computed in
    fp32); a dense projection's gradient is dH itself."""
    if rule is None:
        return None, dH.to(left.dtype), None
    with no_autocast(dH):
        return phm_weight_backward(dH, rule, left, right)


def check_device(x: Tensor) -> None:
    # Without this, CPU tensors would fail inside phm_weight with the dispatcher's message.
    if x.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got x on {x.device}")


def _bias(b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bias as the kernels read it: contiguous, in x's dtype or float32 (kept: no rounding)."""
    if b is None:
        return None
    return (b if b.dtype in (dtype, torch.float32) else b.float()).contiguous()


# ---- fake (meta) impls of the C++ ops: shapes and dtypes only, for torch.compile / FakeTensor ----

@torch.library.register_fake("compacter_kernels::cuda_adapter_fwd")
def _cuda_adapter_fwd_fake(x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype):
    torch._check(x.dim() == 2 and h_down.dim() == 2, lambda: "cuda_adapter_fwd: x and h_down must be 2-D")
    M, k = x.shape[0], h_down.shape[1]
    return x.new_empty((M, x.shape[1]), dtype=out_dtype), x.new_empty((M, k))


@torch.library.register_fake("compacter_kernels::cuda_adapter_bwd")
def _cuda_adapter_bwd_fake(dy, x, z, h_down, h_up, activation, scale, has_residual):
    torch._check(x.dim() == 2 and z.dim() == 2, lambda: "cuda_adapter_bwd: x and z must be 2-D")
    (M, d), k = x.shape, z.shape[1]
    f32 = lambda *s: x.new_empty(s, dtype=torch.float32)  # noqa: E731
    return x.new_empty((M, d)), f32(d, k), f32(k, d), f32(k), f32(d)


# ---- the differentiable op on the factors (what torch.compile and autograd see) -----------------

def _adapter_fwd(
    x: Tensor, residual: Optional[Tensor],
    rule_down: Optional[Tensor], left_down: Tensor, right_down: Optional[Tensor], bias_down: Optional[Tensor],
    rule_up: Optional[Tensor], left_up: Tensor, right_up: Optional[Tensor], bias_up: Optional[Tensor],
    activation: str, scale: float, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y in out_dtype, z, H_down, H_up) for 2-D x (M, d); the arguments of ``triton_adapter_fwd``.
    A PHM projection's H is kept for backward (d*k elements; a dense projection's matrix is its
    weight, so an empty placeholder here). rule_* None means the projection is dense (left_* is
    the matrix). Under autocast x comes in the autocast dtype while the parameters keep theirs
    (see `_run`), and out_dtype may be wider than x's."""
    check_device(x)
    h_down = dense_h(rule_down, left_down, right_down, x.dtype)
    h_up = dense_h(rule_up, left_up, right_up, x.dtype)
    y, z = torch.ops.compacter_kernels.cuda_adapter_fwd(
        rows(x), None if residual is None else rows(residual), h_down, _bias(bias_down, x.dtype), h_up,
        _bias(bias_up, x.dtype), ACT_CODE[activation], scale, out_dtype)
    # A dense projection's matrix is its weight (an input: not an output of the op).
    return y, z, *(x.new_empty(0) if rule is None else h for rule, h in ((rule_down, h_down), (rule_up, h_up)))


def h_shapes(D: int, K: int, down, up) -> tuple:
    """The shapes of the H's the forward keeps: a PHM projection's, not a dense one's."""
    return (D, K) if down[0] is not None else (0,), (K, D) if up[0] is not None else (0,)


adapter_fwd = torch.library.custom_op("compacter_kernels::cuda_compacter_fwd", _adapter_fwd, mutates_args=())


def _kernels_bwd(dy, x, z, h_down, h_up, rd, ld, rgd, bd, ru, lu, rgu, bu, activation, scale, has_residual,
                 shared_rule):
    h_down = h_down if h_down.numel() else dense_h(rd, ld, rgd, x.dtype)  # the forward's, or the weight
    h_up = h_up if h_up.numel() else dense_h(ru, lu, rgu, x.dtype)
    dx, dHd, dHu, dbd, dbu = torch.ops.compacter_kernels.cuda_adapter_bwd(dy, x, z, h_down, h_up,
                                                                         ACT_CODE[activation], scale, has_residual)
    g_rd, g_ld, g_rgd = dh_to_factors(dHd, rd, ld, rgd)
    g_ru, g_lu, g_rgu = dh_to_factors(dHu, ru, lu, rgu)
    if shared_rule:
        g_rd = g_rd + g_ru
    # d residual = dy, a tensor of its own (autograd may keep it as residual.grad).
    return (dx, dy.clone() if has_residual else None, g_rd, g_ld, g_rgd, None if bd is None else dbd.to(bd.dtype),
            g_ru, g_lu, g_rgu, None if bu is None else dbu.to(bu.dtype))


# ---- backend entry points (signatures of compacter_kernels.reference) ---------------------------

# The backward calls the C++ ops directly either way: no Python op of its own to bypass.
compacter_adapter, adapter = adapter_entry_points(
    register_adapter_op(adapter_fwd, _adapter_fwd, _kernels_bwd, _kernels_bwd, h_shapes))
