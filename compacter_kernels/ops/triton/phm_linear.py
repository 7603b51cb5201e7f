"""PHM linear in Triton: y = x @ H + b with the tiles of H built in registers from the factors.

Backward, three launches:  dx = dy @ H^T  (the same kernel, reading H transposed),
           dH = x^T @ dy, db = sum_rows dy  (reduce_rows: split-M partial sums),
           the fixed-order sum of the splits and dH -> (d rule, d W_left, d W_right) (factor_grads).

The factors may be in another dtype than x (fp32 under autocast): H tiles are summed in fp32 and
rounded once to x's dtype before tl.dot, and each factor's gradient comes back in its dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import Projection, math_phm_linear_grads, out_features, rows, traced
from . import config
from .grads import GradsInput, factor_grads, reduce_rows
from .kron import HForm, build_h, h_form, h_tile, kernel_h, prebuilds
from .launch import LAUNCH_LOCK, cdiv, empty


@triton.jit
def _phm_matmul_kernel(
    x_ptr, y_ptr, rule_ptr, left_ptr, right_ptr, b_ptr,
    M, KRED, NOUT, sx, P, Q, HO,
    TRANS: tl.constexpr, MODE: tl.constexpr, N: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """y (M, NOUT) = x (M, KRED) @ H, or @ H^T when TRANS; H is (HI, HO) = (P*N, Q*N)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < NOUT
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, KRED, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < KRED
        xt = tl.load(x_ptr + offs_m[:, None] * sx + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_h = mask_k[:, None] & mask_n[None, :]
        if TRANS:  # tile[kk, j] = H[j, kk]
            h = h_tile(rule_ptr, left_ptr, right_ptr, offs_n[None, :], offs_k[:, None], mask_h, P, Q, HO, MODE, N, R)
        else:
            h = h_tile(rule_ptr, left_ptr, right_ptr, offs_k[:, None], offs_n[None, :], mask_h, P, Q, HO, MODE, N, R)
        if IEEE:
            acc += tl.dot(xt, h.to(dtype), input_precision="ieee")
        else:
            acc += tl.dot(xt, h.to(dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * NOUT + offs_n[None, :], acc.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=1024)  # a pure function of a few integers, on every call
def _matmul_plan(M: int, KRED: int, NOUT: int, dtype: torch.dtype, form: HForm, has_bias: bool, trans: bool):
    """(grid, constexprs but H's form, whether H is prebuilt) of the PHM matmul of a projection
    of this form."""
    BM, BN, BK, warps = config.matmul_blocks(KRED, NOUT, dtype)
    consts = dict(TRANS=trans, HAS_BIAS=has_bias, BM=BM, BN=BN, BK=BK, IEEE=dtype == torch.float32, num_warps=warps)
    return (cdiv(M, BM), cdiv(NOUT, BN)), consts, prebuilds(form, BN)


def _matmul_h(x2: Tensor, p: Projection, trans: bool) -> Tensor:
    """x2 @ H + bias (x2 @ H^T when trans; p.bias None then) for the PHM projection p."""
    n = p.rule.shape[0]
    HI, HO = n * p.left.shape[1], out_features(p)
    M, KRED = x2.shape
    NOUT = HI if trans else HO
    y = empty((M, NOUT), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    grid, consts, prebuilt = _matmul_plan(M, KRED, NOUT, x2.dtype, h_form(p), p.bias is not None, trans)
    kh = kernel_h(p, build_h([p], x2.dtype)[0] if prebuilt else None, x2.dtype)
    with LAUNCH_LOCK:
        _phm_matmul_kernel[grid](
            x2, y, kh.rule, kh.left, kh.right, p.bias if p.bias is not None else x2, M, KRED, NOUT, x2.stride(0),
            HI // n, HO // n, HO, MODE=kh.form.mode, N=kh.form.n, R=kh.form.r, **consts)
    return y


def phm_linear_forward(x: Tensor, rule: Tensor, left: Tensor, right: Optional[Tensor],
                       bias: Optional[Tensor]) -> Tensor:
    """y (M, O) = x (M, I) @ H + bias for 2-D x, in one launch (two where H is prebuilt)."""
    return _matmul_h(rows(x), Projection(rule, left, right, bias), trans=False)


def phm_linear_backward(dy: Tensor, x: Tensor, rule: Tensor, left: Tensor, right: Optional[Tensor],
                        bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d rule, d left, d right, d bias) in three launches (dx; reduce_rows; factor_grads),
    each gradient in its parameter's dtype; an absent parameter's an empty placeholder."""
    dy2 = rows(dy)
    dx = _matmul_h(dy2, Projection(rule, left, right, None), trans=True)
    M, I = x.shape
    O = dy2.shape[1]
    if M == 0:
        grads = [None if t is None else torch.zeros_like(t) for t in (rule, left, right, bias)]
    else:
        partials = reduce_rows(rows(x), dy2, colsum=bias is not None,
                               floor_bytes=(2 * M * I + M * O) * x.element_size(), reads=rule.shape[0])
        (g_rule, g_left, g_right), _, (g_bias, _) = factor_grads(
            partials, GradsInput(rule, left, right, 0, O, 1), biases=(None if bias is None else (bias, 0, O), None))
        grads = [g_rule, g_left, g_right, g_bias]
    return dx, *(x.new_empty(0) if g is None else g for g in grads)  # outputs may not alias: one each


# ---- custom ops: what torch.compile, FakeTensor and dispatch modes see ---------------------------

phm_linear_fwd = torch.library.custom_op("compacter_kernels::triton_phm_linear_fwd", phm_linear_forward,
                                         mutates_args=())
phm_linear_bwd = torch.library.custom_op("compacter_kernels::triton_phm_linear_bwd", phm_linear_backward,
                                         mutates_args=())


@phm_linear_fwd.register_fake
def _(x, rule, left, right, bias):
    return x.new_empty((x.shape[0], out_features(Projection(rule, left, right, bias))))


@phm_linear_bwd.register_fake
def _(dy, x, rule, left, right, bias):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return x.new_empty(x.shape), like(rule), like(left), like(right), like(bias)


class TritonPHMLinear(torch.autograd.Function):
    """y = x @ H + bias for 2-D x with autograd, on the two custom ops (eager and torch.compile alike)."""

    @staticmethod
    def forward(ctx, x, rule, left, right, bias):
        ctx.save_for_backward(x, rule, left, right, bias)
        return (phm_linear_fwd if traced(x) else phm_linear_forward)(x, rule, left, right, bias)

    @staticmethod
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return math_phm_linear_grads(ctx, inputs, dy)
        grads = (phm_linear_bwd if traced(dy) else phm_linear_backward)(dy, *inputs)
        return tuple(None if t is None else g for t, g in zip(inputs, grads))
