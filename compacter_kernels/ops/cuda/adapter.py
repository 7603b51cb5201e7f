"""Fused bottleneck adapter on the CUDA extension's kernels: Compacter (PHM weights) and Houlsby.

Import only once ``compacter_kernels._C`` has loaded: ``_extension._register()`` does, since the
registrations below need the C++ ops ``compacter_kernels::cuda_adapter_fwd`` / ``_bwd`` /
``cuda_build_h`` (csrc/ops.cpp; kernels in csrc/adapter_*.cuh).

The row kernels take DENSE ``H_down`` (d, k) and ``H_up`` (k, d) in x's dtype. Forward, two
launches: ``cuda_build_h`` builds every PHM projection's H in fp32 from its factors (any float
dtype) and rounds it once to x's dtype (a dense weight of another dtype is converted; one in x's
dtype is read as it is), and those H's are kept for backward; then, per block of rows:

    z = x @ H_down + b_down;  g = act(z);  y = r + scale * (g @ H_up + b_up)   (r = residual or x)

and z (M x k, x's dtype) is saved for backward. Backward, three launches (``cuda_adapter_bwd``),
with du = scale * dy:

    dg = du @ H_up^T;   dz = dg * act'(z);   dx = [dy +] dz @ H_down^T   (no dy term with a residual)
    dH_down = x^T @ dz,  db_down = sum_rows dz;   dH_up = g^T @ du,  db_up = sum_rows du
    dH -> (d rule, d W_left, d W_right) (H = sum_i kron(A_i, S_i T_i)), or dH itself for a dense
    projection; d residual = dy (copied by the first kernel).

Every reduction over rows is a fixed-order sum of per-split fp32 partials (no atomics): the
gradients are bit-identical from run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..autograd import (ACT_CODE, adapter_entry_points, adapter_forward_op, multitask_entry_points,
                        register_adapter_op, rows)

if not hasattr(torch.ops.compacter_kernels, "cuda_adapter_fwd"):
    raise ImportError("compacter_kernels.ops.cuda needs the CUDA extension's ops: it is imported by "
                      "compacter_kernels._extension once compacter_kernels._C has loaded (see "
                      "compacter_kernels.available_backends()['cuda'])")


def build_h(projections, dtype: torch.dtype) -> list:
    """Each (rule, left, right) projection's H (I, O) in ``dtype``, one launch: summed in fp32
    from a PHM projection's factors and rounded once; a dense matrix of another dtype converted;
    an empty tensor for a dense matrix already in dtype (use it as it is)."""
    rules, lefts, rights = zip(*projections)
    return torch.ops.compacter_kernels.cuda_build_h(list(rules), list(lefts), list(rights), dtype)


def check_device(x: Tensor) -> None:
    # Without this, CPU tensors would fail inside cuda_build_h with the dispatcher's message.
    if x.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got x on {x.device}")


def _bias(b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bias as the kernels read it: contiguous, in x's dtype or float32 (kept: no rounding)."""
    if b is None:
        return None
    return (b if b.dtype in (dtype, torch.float32) else b.float()).contiguous()


# ---- fake (meta) impls of the C++ ops: shapes and dtypes only, for torch.compile / FakeTensor ----

@torch.library.register_fake("compacter_kernels::cuda_adapter_fwd")
def _cuda_adapter_fwd_fake(x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype, store_z=True):
    torch._check(x.dim() == 2 and h_down.dim() == 2, lambda: "cuda_adapter_fwd: x and h_down must be 2-D")
    M, k = x.shape[0], h_down.shape[1]
    return x.new_empty((M, x.shape[1]), dtype=out_dtype), x.new_empty((M, k) if store_z else (0,))


@torch.library.register_fake("compacter_kernels::cuda_adapter_bwd")
def _cuda_adapter_bwd_fake(dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                           right_up, bias_up, activation, scale, has_residual, shared_rule):
    torch._check(x.dim() == 2 and z.dim() == 2, lambda: "cuda_adapter_bwd: x and z must be 2-D")
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return (torch.empty_like(x), dy.new_empty(x.shape if has_residual else (0,)), like(rule_down), like(left_down),
            like(right_down), like(bias_down), x.new_empty(0) if shared_rule else like(rule_up), like(left_up),
            like(right_up), like(bias_up))


def _built_shape(rule, left, right, dtype) -> tuple:
    if rule is not None:
        return rule.shape[0] * left.shape[1], rule.shape[0] * (left if right is None else right).shape[2]
    return tuple(left.shape) if left.dtype != dtype else (0,)


@torch.library.register_fake("compacter_kernels::cuda_build_h")
def _cuda_build_h_fake(rules, lefts, rights, dtype):
    return [left.new_empty(_built_shape(r, left, t, dtype), dtype=dtype) for r, left, t in zip(rules, lefts, rights)]


@torch.library.register_fake("compacter_kernels::cuda_phm_grads")
def _cuda_phm_grads_fake(dh, rule, left, right):
    like = lambda t: dh.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return like(rule), like(left), like(right)


# ---- the differentiable op on the factors (what torch.compile and autograd see) -----------------

def _inference(*args):
    """y alone, where no gradient is wanted (no_grad, inference_mode, frozen weights): z not written."""
    return _forward(*args, store_z=False)[0]


def _forward(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
             activation, scale, out_dtype, store_z: bool = True):
    """(y in out_dtype, z, H_down, H_up) for 2-D x (M, d), in two launches; the arguments of
    ``triton_adapter_fwd``. The H's built (`build_h`) are kept for backward (d*k elements each; an
    empty placeholder for a dense weight in x's dtype, which backward reads as it is). rule_* None
    means the projection is dense (left_* is the matrix). Under autocast x comes in the autocast
    dtype while the parameters keep theirs, and out_dtype may be wider than x's."""
    check_device(x)
    down, up = (rule_down, left_down, right_down), (rule_up, left_up, right_up)
    h_down, h_up = build_h((down, up), x.dtype)  # empty where the kernels read a dense weight as it is
    y, z = torch.ops.compacter_kernels.cuda_adapter_fwd(
        x, residual, h_down if h_down.numel() else left_down, _bias(bias_down, x.dtype),
        h_up if h_up.numel() else left_up, _bias(bias_up, x.dtype), ACT_CODE[activation], scale, out_dtype, store_z)
    return y, z, h_down, h_up


def h_shapes(D: int, K: int, down, up, dtype: torch.dtype) -> tuple:
    """The shapes of the H's the forward keeps: a PHM projection's, and a dense weight's
    converted to x's dtype (a weight already in it is used as it is: (0,))."""
    return _built_shape(*down, dtype), _built_shape(*up, dtype)


adapter_fwd, _adapter_fwd = adapter_forward_op("compacter_kernels::cuda_compacter_fwd", _forward)


def _kernels_bwd(dy, x, z, h_down, h_up, rd, ld, rgd, bd, ru, lu, rgu, bu, activation, scale, has_residual,
                 shared_rule):
    return torch.ops.compacter_kernels.cuda_adapter_bwd(
        rows(dy), x, z, h_down if h_down.numel() else ld, h_up if h_up.numel() else lu, rd, ld, rgd, bd, ru, lu, rgu,
        bu, ACT_CODE[activation], scale, has_residual, shared_rule)


# ---- backend entry points (signatures of compacter_kernels.reference) ---------------------------

# The backward calls the C++ ops directly either way: no Python op of its own to bypass.
compacter_adapter, adapter = adapter_entry_points(
    register_adapter_op(adapter_fwd, _forward, _kernels_bwd, None, h_shapes), _inference)
# Mixed-task batches: one call of the fused single-task op per task present (no grouped kernel yet).
multitask_compacter_adapter, multitask_adapter = multitask_entry_points(compacter_adapter, adapter)
