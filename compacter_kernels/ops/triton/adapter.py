"""Fused bottleneck adapter in Triton: Compacter (PHM weights) and dense Houlsby, fwd and bwd.

Forward, one program per block of BM rows (H tiles are built in registers from the factors,
never written to memory):

    z = x @ H_down + b_down          (accumulated over d in BD chunks)
    g = act(z)
    y = r + scale * (g @ H_up + b_up) (written in BD chunks; r = residual or x)

z is saved for backward (M*k elements, k << d). Backward, with du = scale * dy:

    kernel 1, rows, per row block:  dg = du @ H_up^T;  dz = dg * act'(z);  g = act(z)
                              (g and dz written, M*k each; d residual = dy)
    kernel 2, columns, per (column tile of d, split of the rows), one pass reading x, dy, g, dz:
                              dx = [dy +] dz @ H_down^T,  dH_down = x^T @ dz,  db_down = sum_rows dz,
                              dH_up^T = du^T @ g,  db_up = sum_rows du   (split partials)
    kernel 3, factor_grads:   the fixed-order sum of the splits, then dH -> (d rule, d W_left, d W_right)
                              of H = sum_i kron(A_i, S_i T_i) for both projections (the shared rule's
                              two parts summed) and the bias sums, each in its parameter's dtype.
    No torch op computes anything between them. Every reduction is a fixed-order sum of
    per-program partials, so gradients are bit-identical run to run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import (ACT_CODE, Projection, adapter_grads, fake_adapter_grads, math_adapter_grads, out_features, rows,
                      save_adapter, traced, transposed)
from . import config
from .grads import GradsInput, Partials, factor_grads
from .kron import KernelH, act_bwd, act_fwd, build_h, group_rows, h_form, h_tile, kernel_h, prebuilds
from .launch import LAUNCH_LOCK, cdiv, device_index, empty, num_programs_target, padded, pow2


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _task_block(pid, order_ptr, counts_ptr, T, BLK, TP: tl.constexpr):
    """Block ``pid`` of the rows grouped by task (each task's rows, in the order ``order_ptr``
    lists them, cut into blocks of BLK; a task's last block may be short): (task, lo, hi, valid),
    rows order[lo:hi] of task ``task``. Programs past the last block get valid False (and a task
    clamped to T - 1, so that its parameters' pointers stay in bounds)."""
    tasks = tl.arange(0, TP)
    cnt = tl.load(counts_ptr + tasks, mask=tasks < T, other=0).to(tl.int32)  # int32: fewer registers
    blocks = (cnt + BLK - 1) // BLK
    ends = tl.cumsum(blocks, axis=0)
    task = tl.sum((ends <= pid).to(tl.int32))
    valid = task < T
    task = tl.minimum(task, T - 1)
    here = tasks == task
    lo = tl.sum(tl.where(tasks < task, cnt, 0)) + (pid - tl.sum(tl.where(here, ends - blocks, 0))) * BLK
    hi = tl.minimum(lo + BLK, tl.sum(tl.where(tasks <= task, cnt, 0)))
    return task, lo, tl.where(valid, hi, lo), valid


@triton.jit
def _task_rows(pid, order_ptr, counts_ptr, T, BM: tl.constexpr, TP: tl.constexpr):
    """(task as int64, row ids, mask) of block ``pid`` of BM grouped rows (`_task_block`)."""
    task, lo, hi, _ = _task_block(pid, order_ptr, counts_ptr, T, BM, TP)
    idx = lo + tl.arange(0, BM)
    mask_m = idx < hi
    return task.to(tl.int64), tl.load(order_ptr + idx, mask=mask_m, other=0).to(tl.int64), mask_m


@triton.jit
def _adapter_fwd_kernel(
    x_ptr, r_ptr, y_ptr, z_ptr,
    rule_down_ptr, left_down_ptr, right_down_ptr, bias_down_ptr, rule_up_ptr, left_up_ptr, right_up_ptr, bias_up_ptr,
    M, D, K, sx, sr, scale,
    order_ptr, counts_ptr, T, t_rule_down, t_left_down, t_right_down, t_bias_down,
    t_rule_up, t_left_up, t_right_up, t_bias_up,
    MODE_D: tl.constexpr, N_D: tl.constexpr, R_D: tl.constexpr,
    MODE_U: tl.constexpr, N_U: tl.constexpr, R_U: tl.constexpr,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, IEEE: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1, STORE_Z: tl.constexpr = True,
):
    """One program per block of BM rows. GROUPED (mixed-task batches): the rows come grouped by
    task (`_task_block`: order_ptr, counts_ptr), and each parameter of task t is at its pointer
    plus t times its task stride (t_rule_down, ...; 0 for one shared by the tasks). STORE_Z False: z
    is not written (no backward will read it)."""
    pid = tl.program_id(0)
    if GROUPED:
        task, offs_m, mask_m = _task_rows(pid, order_ptr, counts_ptr, T, BM, TP)
        rule_down_ptr += task * t_rule_down
        left_down_ptr += task * t_left_down
        right_down_ptr += task * t_right_down
        bias_down_ptr += task * t_bias_down
        rule_up_ptr += task * t_rule_up
        left_up_ptr += task * t_left_up
        right_up_ptr += task * t_right_up
        bias_up_ptr += task * t_bias_up
    else:
        offs_m = (pid * BM + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < M
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    dtype = x_ptr.dtype.element_ty  # compute dtype; y may be wider (autocast keeps an fp32 residual)
    # Down projection: H_down is (D, K), P = D / N_D, Q = K / N_D.
    z = tl.zeros((BM, KP), tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        xt = tl.load(x_ptr + offs_m[:, None] * sx + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        h = h_tile(rule_down_ptr, left_down_ptr, right_down_ptr, offs_d[:, None], offs_k[None, :],
                   mask_d[:, None] & mask_k[None, :],
                   D // N_D, K // N_D, K, MODE_D, N_D, R_D)
        z += _dot(xt, h.to(dtype), IEEE)
    if HAS_BD:
        z += tl.load(bias_down_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    # z and u are rounded to the input dtype where the reference rounds them, so a low-precision
    # bottleneck that overflows gives the reference's inf/nan, and backward sees forward's z.
    z = z.to(dtype)
    if STORE_Z:
        tl.store(z_ptr + offs_m[:, None] * K + offs_k[None, :], z, mask=mask_m[:, None] & mask_k[None, :])
    g = tl.where(mask_k[None, :], act_fwd(z.to(tl.float32), ACT), 0.0).to(dtype)
    # Up projection: H_up is (K, D), P = K / N_U, Q = D / N_U; y written chunk by chunk.
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        mask = mask_m[:, None] & mask_d[None, :]
        h = h_tile(rule_up_ptr, left_up_ptr, right_up_ptr, offs_k[:, None], offs_d[None, :],
                   mask_k[:, None] & mask_d[None, :],
                   K // N_U, D // N_U, D, MODE_U, N_U, R_U)
        u = _dot(g, h.to(dtype), IEEE)
        if HAS_BU:
            u += tl.load(bias_up_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        u = u.to(dtype).to(tl.float32)
        if HAS_RES:
            res = tl.load(r_ptr + offs_m[:, None] * sr + offs_d[None, :], mask=mask, other=0.0)
        else:
            res = tl.load(x_ptr + offs_m[:, None] * sx + offs_d[None, :], mask=mask, other=0.0)
        y = res.to(tl.float32) + scale * u
        tl.store(y_ptr + offs_m[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_rows_kernel(
    dy_ptr, z_ptr, dres_ptr, g_ptr, dz_ptr, rule_up_ptr, left_up_ptr, right_up_ptr,
    M, D, K, sdy, scale,
    order_ptr, counts_ptr, T, t_rule_up, t_left_up, t_right_up,
    MODE_U: tl.constexpr, N_U: tl.constexpr, R_U: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, IEEE: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1,
):
    """The rows kernel: per block of BM rows, dg = du @ H_up^T, dz = dg * act'(z), g = act(z)
    (both written, M*k each) and, with a residual, d residual = dy. GROUPED: as the forward's."""
    pid = tl.program_id(0)
    if GROUPED:
        task, offs_m, mask_m = _task_rows(pid, order_ptr, counts_ptr, T, BM, TP)
        rule_up_ptr += task * t_rule_up
        left_up_ptr += task * t_left_up
        right_up_ptr += task * t_right_up
    else:
        offs_m = (pid * BM + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < M
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    mask_mk = mask_m[:, None] & mask_k[None, :]
    dtype = z_ptr.dtype.element_ty
    # dg = dy @ H_up^T, the (BD, KP) tiles of H_up^T built directly: tile[j, kk] = H_up[kk, j].
    dg = tl.zeros((BM, KP), tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        dyt = tl.load(dy_ptr + offs_m[:, None] * sdy + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if HAS_RES:  # d residual = dy, a tensor of its own (autograd may keep it as residual.grad)
            tl.store(dres_ptr + offs_m[:, None] * D + offs_d[None, :], dyt, mask=mask_m[:, None] & mask_d[None, :])
        ht = h_tile(rule_up_ptr, left_up_ptr, right_up_ptr, offs_k[None, :], offs_d[:, None],
                    mask_d[:, None] & mask_k[None, :],
                    K // N_U, D // N_U, D, MODE_U, N_U, R_U)
        dg += _dot(dyt.to(dtype), ht.to(dtype), IEEE)
    z = tl.load(z_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_mk, other=0.0).to(tl.float32)
    dz = tl.where(mask_k[None, :], scale * dg * act_bwd(z, ACT), 0.0).to(dtype)
    tl.store(dz_ptr + offs_m[:, None] * K + offs_k[None, :], dz, mask=mask_mk)
    tl.store(g_ptr + offs_m[:, None] * K + offs_k[None, :], act_fwd(z, ACT).to(dtype), mask=mask_mk)


@triton.jit
def _adapter_cols_kernel(
    x_ptr, dy_ptr, g_ptr, dz_ptr, dx_ptr, part_ptr, csum_ptr, rule_down_ptr, left_down_ptr, right_down_ptr,
    M, D, K, sx, sdy, rows_per_split, scale,
    order_ptr, counts_ptr, T, t_rule_down, t_left_down, t_right_down,
    MODE_D: tl.constexpr, N_D: tl.constexpr, R_D: tl.constexpr, HAS_RES: tl.constexpr,
    BA: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr, IEEE: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1,
):
    """The columns kernel: per (BA columns of d, split of the rows), one pass over the rows that
    reads x, dy, g and dz once for all three products:

        dx[rows, cols]            = [dy +] dz @ H_down[cols, :]^T      (H_down's tile built once)
        part[split, 0, cols, :]   = x^T @ dz            (dH_down)
        part[split, 1, cols, :]   = scale * dy^T @ g    (dH_up^T)
        csum[split, :K]           = sum_rows dz         (db_down; column tile 0)
        csum[split, K + cols]     = scale * sum_rows dy (db_up)

    GROUPED: each split is rows_per_split rows of one task (`_task_block`), read through order_ptr,
    with that task's H_down.
    """
    pid_a, split = tl.program_id(0), tl.program_id(1)
    if GROUPED:
        task, m_lo, m_hi, _ = _task_block(split, order_ptr, counts_ptr, T, rows_per_split, TP)
        task = task.to(tl.int64)
        rule_down_ptr += task * t_rule_down
        left_down_ptr += task * t_left_down
        right_down_ptr += task * t_right_down
    else:
        m_lo = split * rows_per_split
        m_hi = tl.minimum(m_lo + rows_per_split, M)
    offs_a = pid_a * BA + tl.arange(0, BA)
    mask_a = offs_a < D
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    dtype = dz_ptr.dtype.element_ty
    # tile[kk, j] = H_down[j, kk] for this program's columns j.
    ht = h_tile(rule_down_ptr, left_down_ptr, right_down_ptr, offs_a[None, :], offs_k[:, None],
                mask_k[:, None] & mask_a[None, :],
                D // N_D, K // N_D, K, MODE_D, N_D, R_D).to(dtype)
    acc_d = tl.zeros((BA, KP), tl.float32)
    acc_u = tl.zeros((BA, KP), tl.float32)
    cs_dz = tl.zeros((KP,), tl.float32)
    cs_dy = tl.zeros((BA,), tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        idx = m0 + tl.arange(0, BM)
        mask_m = idx < m_hi
        if GROUPED:
            offs_m = tl.load(order_ptr + idx, mask=mask_m, other=0).to(tl.int64)
        else:
            offs_m = idx.to(tl.int64)
        mk = mask_m[:, None] & mask_k[None, :]
        ma = mask_m[:, None] & mask_a[None, :]
        dzt = tl.load(dz_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mk, other=0.0)
        gt = tl.load(g_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mk, other=0.0)
        xt = tl.load(x_ptr + offs_m[:, None] * sx + offs_a[None, :], mask=ma, other=0.0)
        dyt = tl.load(dy_ptr + offs_m[:, None] * sdy + offs_a[None, :], mask=ma, other=0.0)
        dx = _dot(dzt, ht, IEEE)
        if not HAS_RES:
            dx += dyt.to(tl.float32)
        tl.store(dx_ptr + offs_m[:, None] * D + offs_a[None, :], dx.to(dtype), mask=ma)
        acc_d += _dot(tl.trans(xt), dzt, IEEE)
        acc_u += _dot(tl.trans(dyt.to(dtype)), gt, IEEE)  # dy may be wider (the fp32 dy of an autocast forward)
        cs_dz += tl.sum(dzt.to(tl.float32), axis=0)
        cs_dy += tl.sum(dyt.to(tl.float32), axis=0)
    part = part_ptr + split.to(tl.int64) * 2 * D * K + offs_a[:, None] * K + offs_k[None, :]
    mask_ak = mask_a[:, None] & mask_k[None, :]
    tl.store(part, acc_d, mask=mask_ak)
    tl.store(part + D * K, acc_u * scale, mask=mask_ak)
    cs = csum_ptr + split * (K + D)
    if pid_a == 0:
        tl.store(cs + offs_k, cs_dz, mask=mask_k)
    tl.store(cs + K + offs_a, cs_dy * scale, mask=mask_a)


@triton.jit
def _group_rows_kernel(ids_ptr, order_ptr, counts_ptr, M, T, C: tl.constexpr, TP: tl.constexpr):
    """`group_rows` alone: a mixed-task batch with no H to prebuild."""
    group_rows(ids_ptr, order_ptr, counts_ptr, M, T, C, TP)


# ---- launchers ----------------------------------------------------------------------------------
#
# A mixed-task batch (``task_ids``, one per row; every parameter stacked per task, a rule of three
# dimensions shared) runs in the same launches as one task: its rows are grouped by task on the
# device (a stable counting sort and the count per task, in one program: no read back to the
# host), and each kernel's GROUPED mode maps its programs to blocks (or splits) of one task's
# rows (`_task_block`), reads and writes those rows through the sort's order (so z, g, dz, dx
# and y stay in the rows' own order) and offsets that task's parameters.

def _saved_h(p: Projection, KP: int, dtype: torch.dtype, grouped: bool) -> bool:
    """Whether the forward builds one H (I, O), (T, I, O) for a mixed-task batch, and keeps it for
    backward: a PHM projection past INKERNEL_H_BUDGET (`prebuilds`); for a mixed-task batch also a
    dense weight in another dtype than x's (converted once). Shapes only: the fake impl decides alike."""
    return prebuilds(h_form(p), KP) or (grouped and p.rule is None and p.left.dtype != dtype)


def _build_hs(down: Projection, up: Projection, need: tuple, dtype: torch.dtype, grouping=None) -> tuple:
    """(H_down, H_up) where ``need`` says so, else None, in one launch that also groups a
    mixed-task batch's rows where ``grouping`` (ids, order, counts) is given."""
    if grouping is None and not any(need):
        return None, None
    T = down.left.shape[0] if grouping is not None else 0
    todo = [p for p, n in zip((down, up), need) if n and p.rule is not None]
    built = iter(build_h(todo, dtype, tasks=T, grouping=grouping) if todo else ())
    if grouping is not None and not todo:
        ids, order, counts = grouping
        with LAUNCH_LOCK:
            _group_rows_kernel[(1,)](ids, order, counts, ids.shape[0], T, **config.grouping_consts(T), num_warps=8)
    return tuple((next(built) if p.rule is not None else p.left.to(dtype).contiguous()) if n else None
                 for p, n in zip((down, up), need))


def _none(t: Optional[Tensor]) -> Optional[Tensor]:
    """None for the empty placeholder a custom op gives in place of an absent tensor."""
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


def adapter_forward(
    x: Tensor, residual: Optional[Tensor],
    rule_down: Optional[Tensor], left_down: Tensor, right_down: Optional[Tensor], bias_down: Optional[Tensor],
    rule_up: Optional[Tensor], left_up: Tensor, right_up: Optional[Tensor], bias_up: Optional[Tensor],
    task_ids: Optional[Tensor], activation: str, scale: float, out_dtype: torch.dtype, store_z: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y in out_dtype, z, H_down, H_up, order, counts) for 2-D x (M, d), in one launch (two where
    an H is built first, `_saved_h`, or a mixed-task batch's rows are grouped: one launch does
    both); an empty tensor for each that is absent: z without store_z (no gradient wanted), an H
    built tile by tile inside the kernel, the grouping of a single-task call. The H's and the
    grouping are kept for backward. rule None: a dense projection (left is the matrix). Under
    autocast the parameters may be in another dtype than x's (H built in fp32, rounded once to
    x's dtype; biases added in fp32) and out_dtype wider than x's (y = fp32 residual + ...)."""
    down = Projection(rule_down, left_down, right_down, bias_down)
    up = Projection(rule_up, left_up, right_up, bias_up)
    M, D = x.shape
    K = out_features(down)
    grouped = task_ids is not None
    T = left_down.shape[0] if grouped else 1
    BM, BD, KP, warps = config.adapter_blocks(D, K, x.dtype)
    y = empty((M, D), dtype=out_dtype, device=x.device)
    z = empty((M, K), dtype=x.dtype, device=x.device) if store_z else x.new_empty(0)
    order, counts = x.new_empty(0), x.new_empty(0)  # outputs of a custom op: none may alias another
    grouping = None
    if grouped:
        order = torch.empty((M,), dtype=torch.int64, device=x.device)  # integers: no NaN poison
        counts = torch.empty((T,), dtype=torch.int64, device=x.device)
        grouping = (task_ids, order, counts)
    need = (_saved_h(down, KP, x.dtype, grouped), _saved_h(up, KP, x.dtype, grouped))
    hd, hu = _build_hs(down, up, need, x.dtype, grouping)
    if M > 0:
        kd, ku = kernel_h(down, hd, x.dtype, grouped), kernel_h(up, hu, x.dtype, grouped)
        r = residual if residual is not None else x
        with LAUNCH_LOCK:
            _adapter_fwd_kernel[(cdiv(M, BM) + (T if grouped else 0),)](  # a task's last block may be short
                x, r, y, z if store_z else x, kd.rule, kd.left, kd.right, bias_down if bias_down is not None else x,
                ku.rule, ku.left, ku.right, bias_up if bias_up is not None else x, M, D, K, x.stride(0), r.stride(0),
                scale, order if grouped else x, counts if grouped else x, T, *kd.task_strides, K if grouped else 0,
                *ku.task_strides, D if grouped else 0, MODE_D=kd.form.mode, N_D=kd.form.n, R_D=kd.form.r,
                MODE_U=ku.form.mode, N_U=ku.form.n, R_U=ku.form.r, HAS_BD=bias_down is not None,
                HAS_BU=bias_up is not None, HAS_RES=residual is not None, ACT=ACT_CODE[activation], BM=BM, BD=BD,
                KP=KP, IEEE=x.dtype == torch.float32, GROUPED=grouped, TP=max(2, pow2(T)) if grouped else 1,
                STORE_Z=store_z, num_warps=warps)
    return y, z, x.new_empty(0) if hd is None else hd, x.new_empty(0) if hu is None else hu, order, counts


@functools.lru_cache(maxsize=1024)
def _columns_plan(M: int, D: int, K: int, e: int, reads: int, programs: int) -> tuple[int, int, int, int, int, int]:
    """(BA, BM, num_warps, column tiles, splits, rows per split) of the columns kernel for x of
    e-byte elements; factor_grads reads its partials ``reads`` times."""
    BA, BM, warps = config.columns_blocks(K, e)
    BA = min(BA, padded(D))
    tiles = cdiv(D, BA)
    splits, rows_per_split = config.split_rows(M, BM, tiles, 2 * D * K * 4 * (1 + reads), (3 * M * D + M * K) * e,
                                               programs)
    return BA, BM, warps, tiles, splits, rows_per_split


def counted_bytes(M: int, D: int, K: int, e: int, n: int, backward: bool, programs: int) -> int:
    """The bytes the kernels load and store of the per-row tensors and the partial buffers (what
    tests/test_traffic.py counts in the interpreter; parameters left out, as in the floor): the
    forward reads x twice (the residual's read in the same program) and writes y and z; the
    backward reads dy twice, x and z once, writes dx, g and dz once, reads g and dz once per
    column tile, and writes the fp32 partials once for factor_grads to read n times (n = 1 for
    dense weights; the bias sums' once). Every re-read counted as DRAM traffic (an upper bound
    where L2 serves it)."""
    if not backward:
        return 3 * M * D * e + M * K * e
    _, _, _, tiles, splits, _ = _columns_plan(M, D, K, e, n, programs)
    partials = splits * (2 * D * K * 4 * (1 + n) + (K + D) * 4 * 2)
    return 4 * M * D * e + M * K * e + 2 * M * K * e * (1 + tiles) + partials


def _grads_input(p: Projection, offset: int, s_row: int, s_col: int, grouped: bool) -> tuple[GradsInput, bool]:
    """factor_grads' input for projection p, its dH partials at ``offset``, H[row, col] at
    row * s_row + col * s_col; and whether its matrix is stored `transposed` (an nn.Linear
    weight's .t()): then taken as the contiguous matrix it is the transpose of, the partials'
    strides swapped, so that its gradient, transposed back, has the matrix's own layout."""
    if not grouped and p.rule is None and transposed(p.left):
        return GradsInput(None, p.left.t(), None, offset, s_col, s_row), True
    return GradsInput(p.rule, p.left, p.right, offset, s_row, s_col), False


def _columns(x, dy, g, dz, dx, kd: KernelH, scale, has_residual, reads, group_args, T, grouped):
    """The columns kernel: dx, and the split partials of dH_down = x^T dz, dH_up^T = scale * dy^T g
    (both (D, K)), db_down = sum dz and db_up = scale * sum dy that factor_grads finishes ->
    (Partials, rows per split)."""
    (M, D), K = x.shape, g.shape[1]
    BA, BM, warps, tiles, splits, rows_per_split = _columns_plan(M, D, K, x.element_size(), reads,
                                                                 num_programs_target(device_index(x)))
    if grouped:
        splits = cdiv(M, rows_per_split) + T  # each task's last split may be short: T more at most
    part = empty((splits, 2, D, K), dtype=torch.float32, device=x.device)
    csum = empty((splits, K + D), dtype=torch.float32, device=x.device)
    with LAUNCH_LOCK:
        _adapter_cols_kernel[(tiles, splits)](
            x, dy, g, dz, dx, part, csum, kd.rule, kd.left, kd.right, M, D, K, x.stride(0), dy.stride(0),
            rows_per_split, scale, *group_args, T, *kd.task_strides, MODE_D=kd.form.mode, N_D=kd.form.n,
            R_D=kd.form.r, HAS_RES=has_residual, BA=BA, BM=BM, KP=padded(K), IEEE=x.dtype == torch.float32,
            GROUPED=grouped, TP=max(2, pow2(T)) if grouped else 1, num_warps=warps)
    return Partials(part, csum), rows_per_split


def adapter_backward(
    dy: Tensor, x: Tensor, z: Tensor, h_down: Tensor, h_up: Tensor, order: Tensor, counts: Tensor,
    rule_down: Optional[Tensor], left_down: Tensor, right_down: Optional[Tensor], bias_down: Optional[Tensor],
    rule_up: Optional[Tensor], left_up: Tensor, right_up: Optional[Tensor], bias_up: Optional[Tensor],
    activation: str, scale: float, has_residual: bool, shared_rule: bool, grouped: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d residual, d rule_down, d left_down, d right_down, d bias_down, d rule_up, d left_up,
    d right_up, d bias_up) of `adapter_forward`, whose z, H's and grouping it takes, in three
    launches: the rows kernel, the columns kernel and factor_grads. Each parameter's gradient
    is in its dtype (stacked per task like the parameter for a mixed-task batch, a rule the
    tasks share getting their sum); an empty tensor for each absent one, for d rule_up with
    shared_rule (d rule_down is then the rule's whole gradient) and for d residual without
    has_residual. With has_residual, dx excludes the residual's dy and d residual is a copy of
    dy, written by the rows kernel as it reads dy."""
    down = Projection(rule_down, left_down, right_down, bias_down)
    up = Projection(rule_up, left_up, right_up, bias_up)
    M, D = x.shape
    K = z.shape[1]
    T = left_down.shape[0] if grouped else 1
    dx = empty((M, D), dtype=x.dtype, device=x.device)
    dres = empty((M, D), dtype=dy.dtype, device=x.device) if has_residual else x.new_empty(0)
    if M == 0:
        grads = [x.new_empty(0) if t is None else torch.zeros_like(t) for t in (*down, *up)]
        if shared_rule:
            grads[4] = x.new_empty(0)
        return (dx, dres, *grads)
    hd, hu = _none(h_down), _none(h_up)
    dy = rows(dy)
    g = empty((M, K), dtype=x.dtype, device=x.device)
    dz = empty((M, K), dtype=x.dtype, device=x.device)
    BM, BD, KP, warps = config.adapter_blocks(D, K, x.dtype, backward=True)
    kd, ku = kernel_h(down, hd, x.dtype, grouped), kernel_h(up, hu, x.dtype, grouped)
    TP = max(2, pow2(T)) if grouped else 1
    group_args = (order, counts) if grouped else (dy, dy)
    ieee = x.dtype == torch.float32
    # dg = scale * dy @ H_up^T, dz = dg * act'(z), g = act(z); d residual = dy.
    with LAUNCH_LOCK:
        _adapter_rows_kernel[(cdiv(M, BM) + (T if grouped else 0),)](
            dy, z, dres if has_residual else dy, g, dz, ku.rule, ku.left, ku.right, M, D, K, dy.stride(0), scale,
            *group_args, T, *ku.task_strides, MODE_U=ku.form.mode, N_U=ku.form.n, R_U=ku.form.r, HAS_RES=has_residual,
            ACT=ACT_CODE[activation], BM=BM, BD=BD, KP=KP, IEEE=ieee, GROUPED=grouped, TP=TP, num_warps=warps)
    # factor_grads reads the partials n times (n of the widest PHM projection; once for dense ones).
    reads = max(1 if p.rule is None else p.rule.shape[-1] for p in (down, up))
    partials, rows_per_split = _columns(x, dy, g, dz, dx, kd, scale, has_residual, reads, group_args, T, grouped)
    # dH_down = x^T dz at the partials' start; H_up[row, col] is (dy^T g)[col, row], after it.
    first, t_first = _grads_input(down, 0, K, 1, grouped)
    second, t_second = _grads_input(up, D * K, 1, K, grouped)
    (g_rd, g_ld, g_rgd), (g_ru, g_lu, g_rgu), (g_bd, g_bu) = factor_grads(
        partials, first, second,
        biases=(None if bias_down is None else (bias_down, 0, K), None if bias_up is None else (bias_up, K, D)),
        shared_rule=shared_rule, grouping=(counts, T, rows_per_split) if grouped else None)
    if t_first:
        g_ld = g_ld.t()
    if t_second:
        g_lu = g_lu.t()
    grads = (g_rd, g_ld, g_rgd, g_bd, g_ru, g_lu, g_rgu, g_bu)
    return (dx, dres, *(x.new_empty(0) if g is None else g for g in grads))  # outputs may not alias


# ---- custom ops: what torch.compile, FakeTensor and dispatch modes see ---------------------------

adapter_fwd = torch.library.custom_op("compacter_kernels::triton_adapter_fwd", adapter_forward, mutates_args=())
adapter_bwd = torch.library.custom_op("compacter_kernels::triton_adapter_bwd", adapter_backward, mutates_args=())


@adapter_fwd.register_fake
def _(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up, task_ids,
      activation, scale, out_dtype, store_z):
    down = Projection(rule_down, left_down, right_down, bias_down)
    up = Projection(rule_up, left_up, right_up, bias_up)
    (M, D), K = x.shape, out_features(down)
    KP, grouped = padded(K), task_ids is not None
    lead = (left_down.shape[0],) if grouped else ()
    hd = x.new_empty((*lead, D, K) if _saved_h(down, KP, x.dtype, grouped) else (0,))
    hu = x.new_empty((*lead, K, D) if _saved_h(up, KP, x.dtype, grouped) else (0,))
    order = x.new_empty(M, dtype=torch.int64) if grouped else x.new_empty(0)
    counts = x.new_empty(lead, dtype=torch.int64) if grouped else x.new_empty(0)
    return x.new_empty((M, D), dtype=out_dtype), x.new_empty((M, K) if store_z else (0,)), hd, hu, order, counts


@adapter_bwd.register_fake
def _(dy, x, z, h_down, h_up, order, counts, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
      bias_up, activation, scale, has_residual, shared_rule, grouped):
    return fake_adapter_grads(dy, x, (rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up),
                              has_residual, shared_rule)


class TritonAdapter(torch.autograd.Function):
    """The fused adapter with autograd: y = r + scale * (act(x @ H_down + b_down) @ H_up + b_up)
    for 2-D x, r = residual or x (see `adapter_forward` for the arguments; ``task_ids`` None: one
    task). The same route in eager mode and under torch.compile, which sees the two custom ops
    (`traced`)."""

    @staticmethod
    def forward(ctx, x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
                task_ids, activation, scale, out_dtype, store_z, shared_rule):
        forward = adapter_fwd if traced(x) else adapter_forward
        y, z, hd, hu, order, counts = forward(x, residual, rule_down, left_down, right_down, bias_down,
                                              rule_down if shared_rule else rule_up, left_up, right_up, bias_up,
                                              task_ids, activation, scale, out_dtype, store_z)
        save_adapter(ctx, (x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
                           bias_up, task_ids), (z, hd, hu, order, counts), (activation, scale, out_dtype), shared_rule)
        return y

    @staticmethod
    def backward(ctx, dy):
        inputs, (z, hd, hu, order, counts) = ctx.saved_tensors[:11], ctx.saved_tensors[11:]
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
            return math_adapter_grads(ctx, inputs, dy)
        x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up, task_ids = inputs
        activation, scale, _ = ctx.consts
        backward = adapter_bwd if traced(dy) else adapter_backward
        dx, dres, *grads = backward(dy, x, z, hd, hu, order, counts, rule_down, left_down, right_down, bias_down,
                                    rule_down if ctx.shared_rule else rule_up, left_up, right_up, bias_up,
                                    activation, scale,
                                       residual is not None, ctx.shared_rule, task_ids is not None)
        return adapter_grads(ctx, inputs, dx, dres, grads)
