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

from ... import reference
from ..autograd import (ACT_CODE, adapter_entry_points, adapter_forward_op, adapter_math, create_graph_grads,
                        multitask_entry_points, op_tensors, out_features, register_adapter_op, rows)
from .common import (LAUNCH_LOCK, MODE_DENSE, MODE_PHM, MODE_PHM_FACTORED, Partials, Projection, act_bwd, act_fwd,
                     build_h, cdiv, device_index, empty, factor_grads, factor_grads_plan, group_rows, grouping_consts,
                     h_consts, h_ptrs, h_tile, interpreting, num_programs_target, padded, pow2, prebuilds, proj_key,
                     run_factor_grads, split_rows)


@functools.lru_cache(maxsize=1024)  # pure: computed once per shape (host time)
def _blocks(d: int, k: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BM, BD, KP, num_warps), kept small for the interpreter.

    On a GPU: the largest tiles whose sm_90 compile spills no registers, read off the compiler
    with scripts/triton_resources.py (table in benchmarks/NOTES.md); not yet tuned by timings.
    """
    KP = padded(k)
    if interpreting():
        return 16, min(padded(d), 32), KP, 4
    BM = 32 if backward or KP > 128 or dtype == torch.float32 else 64
    BD = 32 if BM * KP >= 64 * 128 else 64  # a wide (BM, KP) accumulator leaves less room per d chunk
    return BM, min(padded(d), BD), KP, 8


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
    rd_ptr, ld_ptr, rgd_ptr, bd_ptr, ru_ptr, lu_ptr, rgu_ptr, bu_ptr,
    M, D, K, sx, sr, scale,
    order_ptr, counts_ptr, T, t_rd, t_ld, t_rgd, t_bd, t_ru, t_lu, t_rgu, t_bu,
    MODE_D: tl.constexpr, N_D: tl.constexpr, R_D: tl.constexpr,
    MODE_U: tl.constexpr, N_U: tl.constexpr, R_U: tl.constexpr,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, IEEE: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1, STORE_Z: tl.constexpr = True,
):
    """One program per block of BM rows. GROUPED (mixed-task batches): the rows come grouped by
    task (`_task_block`: order_ptr, counts_ptr), and each parameter of task t is at its pointer
    plus t times its task stride (t_rd, ...; 0 for one shared by the tasks). STORE_Z False: z
    is not written (no backward will read it)."""
    pid = tl.program_id(0)
    if GROUPED:
        task, offs_m, mask_m = _task_rows(pid, order_ptr, counts_ptr, T, BM, TP)
        rd_ptr += task * t_rd
        ld_ptr += task * t_ld
        rgd_ptr += task * t_rgd
        bd_ptr += task * t_bd
        ru_ptr += task * t_ru
        lu_ptr += task * t_lu
        rgu_ptr += task * t_rgu
        bu_ptr += task * t_bu
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
        h = h_tile(rd_ptr, ld_ptr, rgd_ptr, offs_d[:, None], offs_k[None, :], mask_d[:, None] & mask_k[None, :],
                   D // N_D, K // N_D, K, MODE_D, N_D, R_D)
        z += _dot(xt, h.to(dtype), IEEE)
    if HAS_BD:
        z += tl.load(bd_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
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
        h = h_tile(ru_ptr, lu_ptr, rgu_ptr, offs_k[:, None], offs_d[None, :], mask_k[:, None] & mask_d[None, :],
                   K // N_U, D // N_U, D, MODE_U, N_U, R_U)
        u = _dot(g, h.to(dtype), IEEE)
        if HAS_BU:
            u += tl.load(bu_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        u = u.to(dtype).to(tl.float32)
        if HAS_RES:
            res = tl.load(r_ptr + offs_m[:, None] * sr + offs_d[None, :], mask=mask, other=0.0)
        else:
            res = tl.load(x_ptr + offs_m[:, None] * sx + offs_d[None, :], mask=mask, other=0.0)
        y = res.to(tl.float32) + scale * u
        tl.store(y_ptr + offs_m[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_bwd_kernel(
    dy_ptr, z_ptr, dres_ptr, g_ptr, dz_ptr, ru_ptr, lu_ptr, rgu_ptr,
    M, D, K, sdy, scale,
    order_ptr, counts_ptr, T, t_ru, t_lu, t_rgu,
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
        ru_ptr += task * t_ru
        lu_ptr += task * t_lu
        rgu_ptr += task * t_rgu
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
        ht = h_tile(ru_ptr, lu_ptr, rgu_ptr, offs_k[None, :], offs_d[:, None], mask_d[:, None] & mask_k[None, :],
                    K // N_U, D // N_U, D, MODE_U, N_U, R_U)
        dg += _dot(dyt.to(dtype), ht.to(dtype), IEEE)
    z = tl.load(z_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_mk, other=0.0).to(tl.float32)
    dz = tl.where(mask_k[None, :], scale * dg * act_bwd(z, ACT), 0.0).to(dtype)
    tl.store(dz_ptr + offs_m[:, None] * K + offs_k[None, :], dz, mask=mask_mk)
    tl.store(g_ptr + offs_m[:, None] * K + offs_k[None, :], act_fwd(z, ACT).to(dtype), mask=mask_mk)


@triton.jit
def _adapter_cols_kernel(
    x_ptr, dy_ptr, g_ptr, dz_ptr, dx_ptr, part_ptr, csum_ptr, rd_ptr, ld_ptr, rgd_ptr,
    M, D, K, sx, sdy, rows_per_split, scale,
    order_ptr, counts_ptr, T, t_rd, t_ld, t_rgd,
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
        rd_ptr += task * t_rd
        ld_ptr += task * t_ld
        rgd_ptr += task * t_rgd
    else:
        m_lo = split * rows_per_split
        m_hi = tl.minimum(m_lo + rows_per_split, M)
    offs_a = pid_a * BA + tl.arange(0, BA)
    mask_a = offs_a < D
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    dtype = dz_ptr.dtype.element_ty
    # tile[kk, j] = H_down[j, kk] for this program's columns j.
    ht = h_tile(rd_ptr, ld_ptr, rgd_ptr, offs_a[None, :], offs_k[:, None], mask_k[:, None] & mask_a[None, :],
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


# ---- torch.library ops: opaque to torch.compile, with fake and autograd registrations ---------

def _prebuilt_hs(down, up, need: tuple, dtype: torch.dtype, saved=(None, None)) -> tuple:
    """(H_down, H_up): each projection's prebuilt H where ``need`` says so (the saved one, or
    built now, both in one launch), else None (its tiles are built inside the kernels). A saved
    H may be None or empty (none kept)."""
    if not (need[0] or need[1]):
        return None, None
    saved = tuple(None if h is None or not h.numel() else h for h in saved)
    build = [n and h is None for n, h in zip(need, saved)]
    built = iter(build_h([p for p, b in zip((down, up), build) if b], dtype) if any(build) else ())
    return tuple(next(built) if b else h for b, h in zip(build, saved))


def h_shapes(D: int, K: int, down, up, dtype: torch.dtype) -> tuple:
    """The shapes of the H's the forward keeps for backward ((0,): none, built in the kernels)."""
    KP = padded(K)
    return ((D, K) if prebuilds(proj_key(*down), KP) else (0,)), ((K, D) if prebuilds(proj_key(*up), KP) else (0,))


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def _fwd_plan(M: int, D: int, K: int, dtype: torch.dtype, pd, pu, has_bd: bool, has_bu: bool, has_res: bool,
              activation: str, store_z: bool):
    """(grid, constexprs, (H_down prebuilt, H_up prebuilt)) of the forward kernel; pd / pu the
    projections' `proj_key`s."""
    BM, BD, KP, warps = _blocks(D, K, dtype)
    need = (prebuilds(pd, KP), prebuilds(pu, KP))
    (mode_d, n_d, r_d), (mode_u, n_u, r_u) = h_consts(pd, need[0]), h_consts(pu, need[1])
    consts = dict(MODE_D=mode_d, N_D=n_d, R_D=r_d, MODE_U=mode_u, N_U=n_u, R_U=r_u, HAS_BD=has_bd, HAS_BU=has_bu,
                  HAS_RES=has_res, ACT=ACT_CODE[activation], BM=BM, BD=BD, KP=KP, IEEE=dtype == torch.float32,
                  STORE_Z=store_z, num_warps=warps)
    return (cdiv(M, BM),), consts, need


def _forward(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
             activation, scale, out_dtype, store_z: bool = True):
    """(y in out_dtype, z or None, H_down or None, H_up or None) for 2-D x (M, d): one launch,
    two where a projection's H is prebuilt (`prebuilds`), which is then returned to be kept for
    backward. rule_* None means the projection is dense (left_* is the matrix). Under autocast
    the parameters may be in another dtype than x's (fp32: H built in fp32, rounded once to x's
    dtype; biases added in fp32) and out_dtype may be wider than x's (y = fp32 residual + ...).
    Without store_z (no gradient wanted: no_grad, inference_mode, frozen weights) z is not written."""
    M, D = x.shape
    K = bias_down.shape[0] if bias_down is not None else out_features(rule_down, left_down, right_down)
    down, up = (rule_down, left_down, right_down), (rule_up, left_up, right_up)
    grid, consts, need = _fwd_plan(M, D, K, x.dtype, proj_key(*down), proj_key(*up), bias_down is not None,
                                   bias_up is not None, residual is not None, activation, store_z)
    y = empty((M, D), dtype=out_dtype, device=x.device)
    z = empty((M, K), dtype=x.dtype, device=x.device) if store_z else None
    hd, hu = _prebuilt_hs(down, up, need, x.dtype)
    if M == 0:
        return y, z, hd, hu
    r = residual if residual is not None else x
    with LAUNCH_LOCK:
        _adapter_fwd_kernel[grid](
            x, r, y, z if store_z else x, *h_ptrs(*down, hd, x.dtype), bias_down if bias_down is not None else x,
            *h_ptrs(*up, hu, x.dtype), bias_up if bias_up is not None else x, M, D, K, x.stride(0), r.stride(0),
            scale, x, x, 1, 0, 0, 0, 0, 0, 0, 0, 0, **consts)
    return y, z, hd, hu


def _inference(*args):
    """y alone, where no gradient is wanted: z not written."""
    return _forward(*args, store_z=False)[0]


adapter_fwd, _adapter_fwd = adapter_forward_op("compacter_kernels::triton_adapter_fwd", _forward)


def columns_blocks(K: int) -> tuple[int, int, int]:
    """(BA, BM, num_warps) of the columns kernel: BA columns of d per program, two (BA, KP) fp32
    accumulators; the largest that compile for sm_90 without spills (scripts/triton_resources.py)."""
    return max(16, min(128, 4096 // padded(K))), 32, 8


@functools.lru_cache(maxsize=1024)
def _columns_plan(M: int, D: int, K: int, e: int, reads: int, programs: int) -> tuple[int, int, int, int, int, int]:
    """(BA, BM, num_warps, column tiles, splits, rows per split) of the columns kernel for x of
    e-byte elements; factor_grads reads its partials ``reads`` times."""
    BA, BM, warps = columns_blocks(K)
    BA = min(BA, padded(D))
    tiles = cdiv(D, BA)
    splits, rows_per_split = split_rows(M, BM, tiles, 2 * D * K * 4 * (1 + reads), (3 * M * D + M * K) * e, programs)
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


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def _bwd_plan(M: int, D: int, K: int, dtype: torch.dtype, pd, pu, has_bd: bool, has_bu: bool, shared_rule: bool,
              has_res: bool, activation: str, programs: int):
    """The backward's three kernels: (rows grid, rows constexprs, columns grid, columns
    constexprs, rows per split, (H_down prebuilt, H_up prebuilt), factor_grads' plan); pd / pu
    the `proj_key`s."""
    BM, BD, KP, warps = _blocks(D, K, dtype, backward=True)
    need = (prebuilds(pd, KP), prebuilds(pu, KP))
    (mode_d, n_d, r_d), (mode_u, n_u, r_u) = h_consts(pd, need[0]), h_consts(pu, need[1])
    ieee = dtype == torch.float32
    rows_consts = dict(MODE_U=mode_u, N_U=n_u, R_U=r_u, HAS_RES=has_res, ACT=ACT_CODE[activation], BM=BM, BD=BD,
                       KP=KP, IEEE=ieee, num_warps=warps)
    # factor_grads reads the partials n times (n of the widest PHM projection; once for dense ones)
    reads = max(pd[0] if isinstance(pd, tuple) else 1, pu[0] if isinstance(pu, tuple) else 1)
    BA, BMc, warps_c, tiles, splits, rows_per_split = _columns_plan(M, D, K, dtype.itemsize, reads, programs)
    cols_consts = dict(MODE_D=mode_d, N_D=n_d, R_D=r_d, HAS_RES=has_res, BA=BA, BM=BMc, KP=KP, IEEE=ieee,
                       num_warps=warps_c)
    # dH_down = x^T dz at the partials' start; H_up[row, col] is (dy^T g)[col, row], after it
    grads = factor_grads_plan(_grads_spec(pd, D, K, 0, K, 1), _grads_spec(pu, K, D, D * K, 1, K),
                              ((K,), 0, K) if has_bd else None, ((D,), K, D) if has_bu else None, shared_rule)
    return (cdiv(M, BM),), rows_consts, (tiles, splits), cols_consts, rows_per_split, need, grads


def _grads_spec(key, I: int, O: int, offset: int, s_row: int, s_col: int) -> tuple:
    """factor_grads' spec (`factor_grads_plan`) of an (I, O) projection with `proj_key` ``key``
    (validated shapes), its dH partials at ``offset``, H[row, col] at row * s_row + col * s_col.
    A dense matrix stored transposed (key "T") is taken as the contiguous matrix it is the
    transpose of, the partials' strides swapped (its gradient, transposed back, has the matrix's
    own layout: an nn.Linear weight's gradient is not copied to match it)."""
    if key == "T":
        return None, (O, I), None, offset, s_col, s_row
    if key is None:
        return None, (I, O), None, offset, s_row, s_col
    n, r = key
    if r == 0:
        return (n, n, n), (n, I // n, O // n), None, offset, s_row, s_col
    return (n, n, n), (n, I // n, r), (n, r, O // n), offset, s_row, s_col


def _columns(x, dy, g, dz, dx, down_ptrs, scale: float, grid, consts: dict, rows_per_split: int) -> Partials:
    """Launches the columns kernel (`_bwd_plan`'s grid and constexprs): dx, and the split partials
    factor_grads finishes."""
    M, D = x.shape
    K = g.shape[1]
    part = empty((grid[1], 2, D, K), dtype=torch.float32, device=x.device)
    csum = empty((grid[1], K + D), dtype=torch.float32, device=x.device)
    with LAUNCH_LOCK:
        _adapter_cols_kernel[grid](x, dy, g, dz, dx, part, csum, *down_ptrs, M, D, K, x.stride(0), dy.stride(0),
                                   rows_per_split, scale, x, x, 1, 0, 0, 0, **consts)
    return Partials(part, csum)


def _backward(dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
              bias_up, activation, scale, has_residual, shared_rule):
    """(dx, d residual, d rule_down, d left_down, d right_down, d bias_down, d rule_up, d left_up,
    d right_up, d bias_up), each parameter's gradient in its dtype, in three launches: the rows
    kernel, the columns kernel and factor_grads. h_down / h_up are the H's the forward kept (None
    or empty where it built them in its kernels). An absent parameter's gradient is None; with
    shared_rule, d rule_down is the rule's whole gradient and d rule_up None.

    With has_residual, dx excludes the residual's dy and d residual is a copy of dy, written by
    the kernel as it reads dy; without, d residual is None.
    """
    M, D = x.shape
    K = z.shape[1]
    dx = empty((M, D), dtype=x.dtype, device=x.device)
    dres = empty((M, D), dtype=dy.dtype, device=x.device) if has_residual else None
    if M == 0:
        grads = [None if t is None else torch.zeros_like(t)
                 for t in (rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up)]
        if shared_rule:
            grads[4] = None
        return (dx, dres, *grads)
    down, up = (rule_down, left_down, right_down), (rule_up, left_up, right_up)
    pd, pu = proj_key(*down), proj_key(*up)
    rows_grid, rows_consts, cols_grid, cols_consts, rows_per_split, need, grads_plan = _bwd_plan(
        M, D, K, x.dtype, pd, pu, bias_down is not None, bias_up is not None, shared_rule, has_residual, activation,
        num_programs_target(device_index(x)))
    hd, hu = _prebuilt_hs(down, up, need, x.dtype, (h_down, h_up))
    dy = rows(dy)
    g = empty((M, K), dtype=x.dtype, device=x.device)
    dz = empty((M, K), dtype=x.dtype, device=x.device)
    with LAUNCH_LOCK:
        _adapter_bwd_kernel[rows_grid](
            dy, z, dres if has_residual else dy, g, dz, *h_ptrs(*up, hu, x.dtype), M, D, K, dy.stride(0), scale,
            dy, dy, 1, 0, 0, 0, **rows_consts)
    # dx, dH_down = x^T dz, dH_up^T = scale * dy^T g (both (D, K)), db_down = sum dz, db_up = scale * sum dy.
    partials = _columns(x, dy, g, dz, dx, h_ptrs(*down, hd, x.dtype), scale, cols_grid, cols_consts, rows_per_split)
    (g_rd, g_ld, g_rgd), (g_ru, g_lu, g_rgu), (g_bd, g_bu) = run_factor_grads(
        grads_plan, partials, (rule_down, left_down.t() if pd == "T" else left_down, right_down),
        (rule_up, left_up.t() if pu == "T" else left_up, right_up), (bias_down, bias_up))
    if pd == "T":
        g_ld = g_ld.t()
    if pu == "T":
        g_lu = g_lu.t()
    return dx, dres, g_rd, g_ld, g_rgd, g_bd, g_ru, g_lu, g_rgu, g_bu


def _adapter_bwd(
    dy: Tensor, x: Tensor, z: Tensor, h_down: Tensor, h_up: Tensor,
    rule_down: Optional[Tensor], left_down: Tensor, right_down: Optional[Tensor], bias_down: Optional[Tensor],
    rule_up: Optional[Tensor], left_up: Tensor, right_up: Optional[Tensor], bias_up: Optional[Tensor],
    activation: str, scale: float, has_residual: bool, shared_rule: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_backward` as the custom op: an absent gradient an empty tensor."""
    return op_tensors(_backward(dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                right_up, bias_up, activation, scale, has_residual, shared_rule), x)


adapter_bwd = torch.library.custom_op("compacter_kernels::triton_adapter_bwd", _adapter_bwd, mutates_args=())


@adapter_bwd.register_fake
def _(dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
      activation, scale, has_residual, shared_rule):
    M, D = x.shape
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return (x.new_empty((M, D)), dy.new_empty((M, D) if has_residual else (0,)), like(rule_down), like(left_down),
            like(right_down), like(bias_down), x.new_empty(0) if shared_rule else like(rule_up), like(left_up),
            like(right_up), like(bias_up))


# ---- mixed-task batches: every task in one launch per kernel ------------------------------------
#
# The rows are grouped by task on the device (a stable counting sort and the count per task, one
# launch of one program, no read back to the host). Each kernel's GROUPED mode maps its programs to blocks
# (or splits) of one task's rows (`_task_block`), reads and writes those rows through the sort's
# order (so z, g, dz, dx and y stay in the rows' own order) and offsets that task's parameters.
# Forward 1 launch; backward the same 3 as one task (factor_grads loops over the tasks).

def _task_hs(down, up, dtype: torch.dtype, KP: int, ids: Tensor, T: int) -> tuple:
    """(order, counts, H_down, H_up): the rows grouped by task (`group_rows`), and the stacked dense
    H's (T, I, O) the GROUPED kernels read instead of building tiles: a dense weight in another
    dtype converted; a PHM projection's past INKERNEL_H_BUDGET, every task's in one build_h
    launch for both, which also groups the rows; None: built in the kernels. One launch."""
    ids = ids.contiguous()  # the kernels read them packed (task_ids may be strided or expanded)
    order = empty((ids.shape[0],), dtype=torch.int64, device=ids.device)
    counts = empty((T,), dtype=torch.int64, device=ids.device)

    need = [prebuilds(proj_key(*p), KP) for p in (down, up)]  # proj_key reads stacked factors alike
    if any(need):
        built = iter(build_h([p for p, n in zip((down, up), need) if n], dtype, tasks=T,
                             grouping=(ids, order, counts)))
    else:
        with LAUNCH_LOCK:
            _group_rows_kernel[(1,)](ids, order, counts, ids.shape[0], T, **grouping_consts(T), num_warps=8)
    hs = tuple(next(built) if n else (p[1].to(dtype).contiguous() if p[0] is None and p[1].dtype != dtype
                                      else None) for n, p in zip(need, (down, up)))
    return (order, counts, *hs)


def _task_args(rule, left, right, H: Optional[Tensor]):
    """(rule, left, right, MODE, N, R, task strides of the three) of one stacked projection for
    the kernels' GROUPED mode; H its stacked dense matrices (`_task_hs`) or None."""
    if rule is None and H is None:
        H = left
    if H is not None:
        s = H[0].numel()
        return H, H, H, MODE_DENSE, 1, 1, (s, s, s)
    t_rule = rule[0].numel() if rule.dim() == 4 else 0
    if right is None:
        return rule, left, left, MODE_PHM, rule.shape[-1], 1, (t_rule, left[0].numel(), left[0].numel())
    return (rule, left, right, MODE_PHM_FACTORED, rule.shape[-1], left.shape[-1],
            (t_rule, left[0].numel(), right[0].numel()))


def _stacked_k(down, bias_down) -> int:
    rule, left, right = down
    if bias_down is not None:
        return bias_down.shape[-1]
    return left.shape[-1] if rule is None else rule.shape[-1] * (left if right is None else right).shape[-1]


def _grouped_fwd(x, residual, ids, T, down, bias_down, up, bias_up, activation, scale, out_dtype, store_z: bool):
    """(y, z or None, order, counts, H_down, H_up) of a mixed-task batch, in two launches (the
    grouping, or build_h with the grouping; `_task_hs`) and the forward kernel: row order[j] of
    x (M, d) goes through the adapter of the task whose block of the grouped rows holds j; the
    grouping and the H's the kernel read (stacked, or None where it built them) are kept for
    backward."""
    M, D = x.shape
    K = _stacked_k(down, bias_down)
    y = empty((M, D), dtype=out_dtype, device=x.device)
    z = empty((M, K), dtype=x.dtype, device=x.device) if store_z else None
    BM, BD, KP, warps = _blocks(D, K, x.dtype)
    order, counts, hd, hu = _task_hs(down, up, x.dtype, KP, ids, T)
    if M == 0:
        return y, z, order, counts, hd, hu
    rd, ld, rgd, mode_d, n_d, r_d, (t_rd, t_ld, t_rgd) = _task_args(*down, hd)
    ru, lu, rgu, mode_u, n_u, r_u, (t_ru, t_lu, t_rgu) = _task_args(*up, hu)
    r2 = residual if residual is not None else x
    with LAUNCH_LOCK:
        _adapter_fwd_kernel[(cdiv(M, BM) + T,)](  # each task's last block may be short: T more at most
            x, r2, y, x if z is None else z, rd, ld, rgd, bias_down if bias_down is not None else x, ru, lu, rgu,
            bias_up if bias_up is not None else x, M, D, K, x.stride(0), r2.stride(0), scale,
            order, counts, T, t_rd, t_ld, t_rgd, K, t_ru, t_lu, t_rgu, D,
            MODE_D=mode_d, N_D=n_d, R_D=r_d, MODE_U=mode_u, N_U=n_u, R_U=r_u,
            HAS_BD=bias_down is not None, HAS_BU=bias_up is not None, HAS_RES=residual is not None,
            ACT=ACT_CODE[activation], BM=BM, BD=BD, KP=KP, IEEE=x.dtype == torch.float32,
            GROUPED=True, TP=max(2, pow2(T)), STORE_Z=store_z, num_warps=warps)
    return y, z, order, counts, hd, hu


def _grouped_bwd(dy, x, z, order, counts, T, hd, hu, down, bias_down, up, bias_up, activation, scale,
                 has_residual: bool, shared_rule: bool):
    """(dx, d residual or None, d rule_down, d left_down, d right_down, d bias_down, d rule_up,
    d left_up, d right_up, d bias_up) of `_grouped_fwd`, in the single-task backward's three
    launches; each gradient stacked per task like its parameter (a rule the tasks share gets
    their summed gradient), None for an absent one (and for d rule_up with shared_rule)."""
    M, D = x.shape
    K = z.shape[1]
    dx = empty((M, D), dtype=x.dtype, device=x.device)
    dres = empty((M, D), dtype=dy.dtype, device=x.device) if has_residual else None
    params = (*down, bias_down, *up, bias_up)
    if M == 0:
        grads = [None if t is None else torch.zeros_like(t) for t in params]
        if shared_rule:
            grads[4] = None
        return (dx, dres, *grads)
    dy2 = rows(dy)
    g = empty((M, K), dtype=x.dtype, device=x.device)
    dz = empty((M, K), dtype=x.dtype, device=x.device)
    BM, BD, KP, warps = _blocks(D, K, x.dtype, backward=True)
    rd, ld, rgd, mode_d, n_d, r_d, t_down = _task_args(*down, hd)
    ru, lu, rgu, mode_u, n_u, r_u, t_up = _task_args(*up, hu)
    TP = max(2, pow2(T))
    with LAUNCH_LOCK:
        _adapter_bwd_kernel[(cdiv(M, BM) + T,)](
            dy2, z, dres if has_residual else dy2, g, dz, ru, lu, rgu, M, D, K, dy2.stride(0), scale,
            order, counts, T, *t_up, MODE_U=mode_u, N_U=n_u, R_U=r_u, HAS_RES=has_residual,
            ACT=ACT_CODE[activation], BM=BM, BD=BD, KP=KP, IEEE=x.dtype == torch.float32, GROUPED=True, TP=TP,
            num_warps=warps)
    n = max(1 if down[0] is None else down[0].shape[-1], 1 if up[0] is None else up[0].shape[-1])
    BA, BMc, warps_c, tiles, splits, rows_per_split = _columns_plan(M, D, K, x.element_size(), n,
                                                                    num_programs_target(device_index(x)))
    splits = cdiv(M, rows_per_split) + T  # each task's last split may be short: T more at most
    part = empty((splits, 2, D, K), dtype=torch.float32, device=x.device)
    csum = empty((splits, K + D), dtype=torch.float32, device=x.device)
    with LAUNCH_LOCK:
        _adapter_cols_kernel[(tiles, splits)](
            x, dy2, g, dz, dx, part, csum, rd, ld, rgd, M, D, K, x.stride(0), dy2.stride(0), rows_per_split,
            scale, order, counts, T, *t_down, MODE_D=mode_d, N_D=n_d, R_D=r_d, HAS_RES=has_residual, BA=BA,
            BM=BMc, KP=KP, IEEE=x.dtype == torch.float32, GROUPED=True, TP=TP, num_warps=warps_c)
    (g_rd, g_ld, g_rgd), (g_ru, g_lu, g_rgu), (g_bd, g_bu) = factor_grads(
        Partials(part, csum), Projection(*down, 0, K, 1), Projection(*up, D * K, 1, K),
        biases=(None if bias_down is None else (bias_down, 0, K), None if bias_up is None else (bias_up, K, D)),
        shared_rule=shared_rule, grouping=(counts, T, rows_per_split))
    return dx, dres, g_rd, g_ld, g_rgd, g_bd, g_ru, g_lu, g_rgu, g_bu


@triton.jit
def _group_rows_kernel(ids_ptr, order_ptr, counts_ptr, M, T, C: tl.constexpr, TP: tl.constexpr):
    """`group_rows` alone: a mixed-task batch with no H to prebuild."""
    group_rows(ids_ptr, order_ptr, counts_ptr, M, T, C, TP)


class _GroupedAdapter(torch.autograd.Function):
    """A mixed-task batch with autograd (eager tensors; torch.compile and torch.func take the
    per-task loop). Under create_graph=True the backward is the per-task loop's torch ops."""

    @staticmethod
    def forward(ctx, x, residual, ids, T, rd, ld, rgd, bd, ru, lu, rgu, bu, activation, scale, out_dtype):
        down, up = (rd, ld, rgd), (ru, lu, rgu)
        y, z, order, counts, hd, hu = _grouped_fwd(x, residual, ids, T, down, bd, up, bu, activation, scale,
                                                   out_dtype, store_z=True)
        ctx.save_for_backward(x, z, order, counts, hd, hu, rd, ld, rgd, bd, ru, lu, rgu, bu, residual, ids)
        ctx.consts = (T, activation, scale, out_dtype)
        ctx.shared_rule = rd is not None and rd is ru
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, order, counts, hd, hu, rd, ld, rgd, bd, ru, lu, rgu, bu, residual, ids = ctx.saved_tensors
        T, activation, scale, out_dtype = ctx.consts
        if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops, one task at a time
            def math(x, residual, _ids, _T, *params):
                return _grouped_math(x, residual, ids, params, activation, scale, out_dtype)
            return create_graph_grads(ctx, math, (x, residual, None, None, rd, ld, rgd, bd, ru, lu, rgu, bu), (), dy)
        dx, dres, *grads = _grouped_bwd(dy, x, z, order, counts, T, hd, hu, (rd, ld, rgd), bd, (ru, lu, rgu), bu,
                                        activation, scale, ctx.has_residual, ctx.shared_rule)
        return (dx, dres, None, None, *grads, None, None, None)


def _grouped_math(x, residual, ids, params, activation, scale, out_dtype):
    """What _GroupedAdapter computes, in the single-task adapter_math per task (a second derivative)."""
    def single(x, rd, ld, rgd, bd, ru, lu, rgu, bu, *, activation, scale, residual):
        return adapter_math(x, residual, rd, ld, rgd, bd, ru, lu, rgu, bu, activation, scale, out_dtype)[0]

    return reference.multitask_compacter_adapter(x, ids, *params, activation=activation, scale=scale,
                                                 residual=residual, single=single)


def _grouped(x, residual, ids, T, down, bias_down, up, bias_up, activation, scale, out_dtype, train: bool):
    """y of a mixed-task batch (see `multitask_entry_points`): with autograd where ``train``, else
    the forward alone, z not written."""
    if train:
        return _GroupedAdapter.apply(x, residual, ids, T, *down, bias_down, *up, bias_up, activation, scale,
                                     out_dtype)
    return _grouped_fwd(x, residual, ids, T, down, bias_down, up, bias_up, activation, scale, out_dtype,
                        store_z=False)[0]


# ---- backend entry points (signatures of compacter_kernels.reference) -------------------------

compacter_adapter, adapter = adapter_entry_points(
    register_adapter_op(adapter_fwd, _forward, adapter_bwd, _backward, h_shapes), _inference, transposed_weights=True)
multitask_compacter_adapter, multitask_adapter = multitask_entry_points(compacter_adapter, adapter, _grouped)
