"""The Kronecker building blocks of the Triton kernels: activations, the H tile built in registers
from the factors, H built once per call (build_h, which can also group a mixed-task batch's rows
by task in the same launch), and how a projection is handed to the kernels."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..common import Projection, out_features, transposed
from . import config
from .launch import LAUNCH_LOCK, cdiv


# How an H is given: dense (I, O) matrix; full PHM weight B; factorised S @ T; a dense matrix
# stored transposed (the (O, I) contiguous weight of an nn.Linear, passed as weight.t()).
MODE_DENSE, MODE_PHM, MODE_PHM_FACTORED, MODE_DENSE_T = 0, 1, 2, 3


# ---- activations (z in fp32) -------------------------------------------------------------------

@triton.jit
def _tanh(u):
    # libdevice tanh fails in the interpreter; this is exact in fp32 range.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:  # gelu_tanh
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 2:  # relu
        return tl.maximum(z, 0.0)
    elif ACT == 3:  # silu
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def act_bwd(z, ACT: tl.constexpr):
    """act'(z)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 2:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 3:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


# ---- H tiles built in registers ----------------------------------------------------------------

@triton.jit
def h_tile(rule_ptr, left_ptr, right_ptr, ri, ci, mask, P, Q, O,
           MODE: tl.constexpr, N: tl.constexpr, R: tl.constexpr):
    """fp32 tile of H[ri, ci] (ri, ci broadcastable index tensors), 0 where ~mask.

    H[a*P + p, c*Q + q] = sum_i rule[i, a, c] * B[i, p, q], B[i] = left[i] (MODE_PHM) or
    left[i] @ right[i] (MODE_PHM_FACTORED); MODE_DENSE reads a contiguous (I, O) matrix,
    MODE_DENSE_T one stored transposed, (O, I) contiguous (N = 1: P = I). Nothing of H is
    written to memory.
    """
    if MODE == 0:
        return tl.load(left_ptr + ri * O + ci, mask=mask, other=0.0).to(tl.float32)
    if MODE == 3:
        return tl.load(left_ptr + ci * P + ri, mask=mask, other=0.0).to(tl.float32)
    a = ri // P
    p = ri % P
    c = ci // Q
    q = ci % Q
    acc = tl.zeros(mask.shape, tl.float32)
    for i in range(N):  # not unrolled, like factor_grads' n-loops (unrolled, build_h spilled at n >= 8, r = 4)
        A = tl.load(rule_ptr + (i * N + a) * N + c, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            B = tl.load(left_ptr + (i * P + p) * Q + q, mask=mask, other=0.0).to(tl.float32)
        else:
            B = tl.zeros(mask.shape, tl.float32)
            for r in tl.static_range(R):
                s = tl.load(left_ptr + (i * P + p) * R + r, mask=ri < P * N, other=0.0).to(tl.float32)
                t = tl.load(right_ptr + (i * R + r) * Q + q, mask=ci < Q * N, other=0.0).to(tl.float32)
                B += s * t
        acc += A * B
    return tl.where(mask, acc, 0.0)


class HForm(NamedTuple):
    """How a kernel reads a projection's H: h_tile's constexprs MODE, N (factors) and R (rank;
    1 for a dense matrix or a full B)."""
    mode: int
    n: int = 1
    r: int = 1


DENSE, DENSE_T = HForm(MODE_DENSE), HForm(MODE_DENSE_T)


def h_form(p: Projection) -> HForm:
    """The form of a projection's H as it is given (shapes and strides only, so the fake impls
    decide alike); stacked per task or not."""
    if p.rule is None:
        return DENSE_T if transposed(p.left) else DENSE
    n = p.rule.shape[-1]
    return HForm(MODE_PHM, n) if p.right is None else HForm(MODE_PHM_FACTORED, n, p.left.shape[-1])


def prebuilds(form: HForm, tile_cols: int) -> bool:
    """Whether a projection's H is built once per call (build_h) rather than tile by tile in
    every program: a PHM projection past config.INKERNEL_H_BUDGET (``tile_cols`` the width of
    the H tiles a program builds per row block)."""
    return form.mode in (MODE_PHM, MODE_PHM_FACTORED) and config.prebuilds(form.n, form.r, tile_cols)


class KernelH(NamedTuple):
    """A projection as a kernel takes it: the (rule, left, right) pointers (a dense or prebuilt H
    three times), H's form, and each pointer's task stride (a mixed-task batch's; 0 for one
    task, or a rule the tasks share)."""
    rule: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    form: HForm
    task_strides: tuple[int, int, int] = (0, 0, 0)


def kernel_h(p: Projection, H: Optional[torch.Tensor], dtype: torch.dtype, tasks: bool = False) -> KernelH:
    """Projection p as a kernel takes it, H its prebuilt dense matrix (stacked per task with
    ``tasks``) or None. ``dtype`` is x's, the dtype of the tl.dot operands: a dense matrix in
    another dtype (autocast) is cast here, once per call, keeping its layout (transposed or not);
    the factors are read as they are (the kernels build H tiles in fp32, rounded once)."""
    if H is None and p.rule is None:
        H = p.left if p.left.dtype == dtype else p.left.to(dtype)  # preserve_format: the same strides
        form = DENSE_T if transposed(H) else DENSE
    else:
        form = DENSE if H is not None else h_form(p)
    if H is not None:
        s = H[0].numel() if tasks else 0
        return KernelH(H, H, H, form, (s, s, s))
    right = p.left if p.right is None else p.right
    if not tasks:
        return KernelH(p.rule, p.left, right, form)
    return KernelH(p.rule, p.left, right, form,
                   (p.rule[0].numel() if p.rule.dim() == 4 else 0, p.left[0].numel(), right[0].numel()))


@triton.jit
def _build_h_tile(rule_ptr, left_ptr, right_ptr, h_ptr, tile, I, O, BR: tl.constexpr, BC: tl.constexpr,
                  MODE: tl.constexpr, N: tl.constexpr, R: tl.constexpr):
    tiles_c = tl.cdiv(O, BC)
    ri = (tile // tiles_c) * BR + tl.arange(0, BR)[:, None]
    ci = (tile % tiles_c) * BC + tl.arange(0, BC)[None, :]
    mask = (ri < I) & (ci < O)
    h = h_tile(rule_ptr, left_ptr, right_ptr, ri, ci, mask, I // N, O // N, O, MODE, N, R)
    tl.store(h_ptr + ri * O + ci, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_rows(ids_ptr, order_ptr, counts_ptr, M, T, C: tl.constexpr, TP: tl.constexpr):
    """In one program: counts[t] = rows of task t, and order = the rows sorted by task, stably (a
    counting sort in two passes over the ids, C at a time): what the grouped kernels read."""
    tasks = tl.arange(0, TP)
    counts = tl.zeros((TP,), tl.int32)
    for m0 in range(0, M, C):
        offs = m0 + tl.arange(0, C)
        ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == tasks[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + tasks, counts.to(tl.int64), mask=tasks < T)
    next_pos = tl.cumsum(counts, axis=0) - counts  # where each task's next row goes
    for m0 in range(0, M, C):
        offs = m0 + tl.arange(0, C)
        ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1).to(tl.int32)
        hit = (ids[:, None] == tasks[None, :]).to(tl.int32)  # (C, TP) one-hot
        rank = tl.cumsum(hit, axis=0) - hit  # same-task rows before this one in the chunk
        pos = tl.sum(hit * (next_pos[None, :] + rank), axis=1)
        tl.store(order_ptr + pos, offs.to(tl.int64), mask=offs < M)
        next_pos += tl.sum(hit, axis=0)


@triton.jit
def _build_h_kernel(rule1, left1, right1, h1, I1, O1, tiles1, rule2, left2, right2, h2, I2, O2,
                    t_rule1, t_left1, t_right1, t_rule2, t_left2, t_right2, ids_ptr, order_ptr, counts_ptr, M, T,
                    MODE1: tl.constexpr, N1: tl.constexpr, R1: tl.constexpr,
                    MODE2: tl.constexpr, N2: tl.constexpr, R2: tl.constexpr, TWO: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr, TP: tl.constexpr):
    """H = sum_i kron(A_i, B_i) of one or two projections, summed in fp32 and rounded once to
    the output's dtype; one (BR, BC) tile per program, the first projection's tiles first.
    Along grid axis 1, the tasks of stacked factors (task t's at t times its stride, its H at
    t * I * O). With GROUP, program (0, 0) groups a mixed-task batch's rows (`group_rows`)
    and the tiles start at program 1: the grouping needs no launch of its own."""
    pid, t = tl.program_id(0) - GROUP, tl.program_id(1)
    if pid < 0:
        if GROUP:
            if t == 0:
                group_rows(ids_ptr, order_ptr, counts_ptr, M, T, C, TP)
    elif pid < tiles1:
        _build_h_tile(rule1 + t * t_rule1, left1 + t * t_left1, right1 + t * t_right1, h1 + t * I1 * O1, pid, I1, O1,
                      BR, BC, MODE1, N1, R1)
    elif TWO:
        _build_h_tile(rule2 + t * t_rule2, left2 + t * t_left2, right2 + t * t_right2, h2 + t * I2 * O2,
                      pid - tiles1, I2, O2, BR, BC, MODE2, N2, R2)


def build_h(projections: list[Projection], dtype: torch.dtype, tasks: int = 0, grouping=None) -> list:
    """The H (I, O) in ``dtype`` of each PHM projection of ``projections`` (one or two), in one
    launch. ``tasks`` T > 0: the factors are stacked per task (a rule of three dimensions shared
    by the tasks), and each H is (T, I, O). ``grouping`` (ids, order, counts): the same launch
    also groups a mixed-task batch's rows by task (`group_rows`), filling order and counts."""
    BR, BC = config.BUILD_H_TILE
    hs, args, strides, forms, tiles = [], [], [], [], []
    for p in projections:
        kh = kernel_h(p, None, dtype, tasks > 0)
        I, O = p.rule.shape[-1] * p.left.shape[-2], out_features(p)
        H = torch.empty((tasks, I, O) if tasks else (I, O), dtype=dtype, device=p.left.device)
        hs.append(H)
        tiles.append(cdiv(I, BR) * cdiv(O, BC))
        args.append((kh.rule, kh.left, kh.right, H, I, O))
        strides.append(kh.task_strides)
        forms.append(kh.form)
    if len(projections) == 1:  # the second projection's arguments repeat the first's (TWO is False)
        args, strides, forms = args * 2, strides * 2, forms * 2
    (f1, f2) = forms
    consts = dict(MODE1=f1.mode, N1=f1.n, R1=f1.r, MODE2=f2.mode, N2=f2.n, R2=f2.r)
    if grouping is None:
        H = hs[0]
        rows_args, consts = (H, H, H, 0, 1), {**consts, "GROUP": False, "C": 16, "TP": 2}
    else:
        ids, order, counts = grouping
        rows_args, consts = (ids, order, counts, ids.shape[0], tasks), {**consts, "GROUP": True,
                                                                          **config.grouping_consts(tasks)}
    with LAUNCH_LOCK:
        _build_h_kernel[(sum(tiles) + (grouping is not None), max(1, tasks))](
            *args[0], tiles[0], *args[1], *strides[0], *strides[1], *rows_args, TWO=len(projections) == 2, BR=BR,
            BC=BC, **consts, num_warps=4)
    return hs
