"""The backward's reductions over rows and the factors' gradients, shared by both Triton ops."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import config
from .launch import LAUNCH_LOCK, cdiv, device_index, empty, num_programs_target, pow2


# ---- the backward's reductions over rows: A^T @ B split over M, then the factors' gradients ------
#
# Two launches finish every parameter gradient, with no torch op between them:
#   a reduction over rows: A^T @ B (and column sums) per split of the rows, fp32 partials
#                  (reduce_rows for phm_linear; the adapter's columns kernel, ops/triton/adapter.py);
#   factor_grads:  the fixed-order sum of the splits and the map dH -> (d rule, d left, d right) of
#                  H = sum_i kron(A_i, B_i), B_i = S_i T_i, both projections of an adapter, the shared
#                  rule's two contributions summed, and the bias sums; each gradient stored in its
#                  parameter's dtype.
# Deterministic: every sum runs in a fixed order, no atomics.

# The most bytes the partial sums may cost, as a fraction of the least traffic of the backward.


@triton.jit
def _reduce_rows_kernel(a_ptr, b_ptr, part_ptr, csum_ptr, M, IA, IB, sa, sb, rows_per_split,
                        COLSUM: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr,
                        IEEE: tl.constexpr):
    """part[split] = A[rows of split]^T @ B[rows of split] (IA, IB) in fp32; csum[split] = the
    column sums of B (stored by the tiles with pid_a 0)."""
    pid, split = tl.program_id(0), tl.program_id(1)
    tiles_b = tl.cdiv(IB, BB)
    offs_a = (pid // tiles_b) * BA + tl.arange(0, BA)
    offs_b = (pid % tiles_b) * BB + tl.arange(0, BB)
    mask_a, mask_b = offs_a < IA, offs_b < IB
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc = tl.zeros((BA, BB), tl.float32)
    csum = tl.zeros((BB,), tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = (m0 + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < m_hi
        at = tl.load(a_ptr + offs_m[:, None] * sa + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_m[:, None] * sb + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(at), bt.to(at.dtype), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(at), bt.to(at.dtype))
        if COLSUM:
            csum += tl.sum(bt.to(tl.float32), axis=0)
    out = part_ptr + split.to(tl.int64) * IA * IB
    tl.store(out + offs_a[:, None] * IB + offs_b[None, :], acc, mask=mask_a[:, None] & mask_b[None, :])
    if COLSUM:
        if pid // tiles_b == 0:
            tl.store(csum_ptr + split * IB + offs_b, csum, mask=mask_b)


class Partials(NamedTuple):  # a NamedTuple: a frozen dataclass costs ~1.5 us to make (host time)
    """What a reduction over rows left for factor_grads: part (splits, products, IA, IB) fp32
    partial dH's, csum (splits, CS) fp32 partial bias sums."""
    part: torch.Tensor
    csum: torch.Tensor


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def _reduce_rows_plan(M: int, IA: int, IB: int, dtype: torch.dtype, colsum: bool, floor_bytes: int, reads: int,
                      programs: int):
    """(grid, rows per split, constexprs) of reduce_rows."""
    BA, BB, BM, warps = config.reduce_rows_blocks(IA, IB, dtype.itemsize)
    tiles = cdiv(IA, BA) * cdiv(IB, BB)
    splits, rows_per_split = config.split_rows(M, BM, tiles, IA * IB * 4 * (1 + reads), floor_bytes, programs)
    consts = dict(COLSUM=colsum, BA=BA, BB=BB, BM=BM, IEEE=dtype == torch.float32, num_warps=warps)
    return (tiles, splits), rows_per_split, consts


def reduce_rows(a, b, *, colsum: bool, floor_bytes: int, reads: int) -> Partials:
    """a^T @ b (IA, IB) from 2-D a (M, IA), b (M, IB) of any row stride, and b's column sums,
    as per-split fp32 partials, in one launch (factor_grads reads them ``reads`` times)."""
    M, IA = a.shape
    IB = b.shape[1]
    grid, rows_per_split, consts = _reduce_rows_plan(M, IA, IB, a.dtype, colsum, floor_bytes, reads,
                                                     num_programs_target(device_index(a)))
    part = empty((grid[1], 1, IA, IB), dtype=torch.float32, device=a.device)
    csum = empty((grid[1], IB), dtype=torch.float32, device=a.device)
    with LAUNCH_LOCK:
        _reduce_rows_kernel[grid](a, b, part, csum, M, IA, IB, a.stride(0), b.stride(0), rows_per_split, **consts)
    return Partials(part, csum)


@triton.jit
def _proj_grads(dA, part_ptr, s_row, s_col, split_stride, S, rule_ptr, left_ptr, right_ptr, dleft_ptr, dright_ptr,
                dleft_acc_ptr, i, p_lo, p_hi, P, Q,
                N: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, HAS_RULE: tl.constexpr,
                FACTORED: tl.constexpr, BP: tl.constexpr, QC: tl.constexpr, WIDE: tl.constexpr):
    """Gradients of slice i of one projection from the split partials of its dH (element
    H[row, col] of split s at part_ptr + s * split_stride + row * s_row + col * s_col), for the
    rows p_lo..p_hi of B_i. Stores d left[i] (d B_i, or d S_i = d B_i T_i^T) and d right[i]
    (d T_i = S_i^T d B_i, which needs every row: p_lo..p_hi must be all of them); returns dA plus
    d rule[i] (NP, NP) in fp32 (dA: what the caller sums it into). Without a rule (a dense
    matrix: N = 1, rule = 1) d left is dH.

        dB_i[p, q]    = sum_{a,c} A[i, a, c] * dH[a*P + p, c*Q + q]
        dA[i, a, c]   = sum_{p,q} dH[a*P + p, c*Q + q] * B_i[p, q]
        dS_i[p, r]    = sum_q dB_i[p, q] * T_i[r, q]
        dT_i[r, q]    = sum_p S_i[p, r] * dB_i[p, q]

    The columns go in chunks of QC (one chunk unless WIDE: a row wider than QC), each over
    every row, so that d T_i's (R, QC) chunk is whole when its rows are done; WIDE and FACTORED,
    d S_i sums over the chunks in order through fp32 partial sums at dleft_acc_ptr (this
    program's rows only), the last chunk storing it.
    """
    ra = tl.arange(0, NP)[:, None]
    rc = tl.arange(0, NP)[None, :]
    offs_r = tl.arange(0, RP)
    for q0 in range(0, Q if WIDE else 1, QC):  # one chunk unless WIDE: no loop for ptxas to carry values over
        if WIDE and FACTORED:
            tl.debug_barrier()  # d S_i's partial sums: the chunk before stored them from other threads
        offs_q = q0 + tl.arange(0, QC)
        mask_q = offs_q < Q
        dT = tl.zeros((RP, QC), tl.float32)
        for p0 in range(p_lo, p_hi, BP):
            offs_p = p0 + tl.arange(0, BP)
            mask_p = offs_p < p_hi
            mask = mask_p[:, None] & mask_q[None, :]
            Bt = tl.zeros((BP, QC), tl.float32)
            if HAS_RULE:
                if FACTORED:
                    for r in tl.static_range(R):
                        s_r = tl.load(left_ptr + (i * P + offs_p) * R + r, mask=mask_p, other=0.0).to(tl.float32)
                        t_r = tl.load(right_ptr + (i * R + r) * Q + offs_q, mask=mask_q, other=0.0).to(tl.float32)
                        Bt += s_r[:, None] * t_r[None, :]
                else:
                    Bt = tl.load(left_ptr + (i * P + offs_p[:, None]) * Q + offs_q[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
            dB = tl.zeros((BP, QC), tl.float32)
            for a in range(N):  # not unrolled: n * n bodies at n = 16 compile for minutes
                for c in range(N):
                    h = part_ptr + (a * P + offs_p[:, None]).to(tl.int64) * s_row + (c * Q + offs_q[None, :]) * s_col
                    t = tl.zeros((BP, QC), tl.float32)
                    for s in range(0, S):
                        t += tl.load(h + s * split_stride, mask=mask, other=0.0)
                    if HAS_RULE:
                        dB += tl.load(rule_ptr + (i * N + a) * N + c).to(tl.float32) * t
                        dA += tl.where((ra == a) & (rc == c), tl.sum(tl.sum(t * Bt, axis=1), axis=0), 0.0)
                    else:
                        dB += t
            if FACTORED:
                for r in tl.static_range(R):
                    t_r = tl.load(right_ptr + (i * R + r) * Q + offs_q, mask=mask_q, other=0.0).to(tl.float32)
                    dS_r = tl.sum(dB * t_r[None, :], axis=1)
                    if WIDE:
                        acc = dleft_acc_ptr + (i * P + offs_p) * R + r
                        if q0 > 0:
                            dS_r += tl.load(acc, mask=mask_p, other=0.0)
                        if q0 + QC < Q:
                            tl.store(acc, dS_r, mask=mask_p)
                        else:
                            tl.store(dleft_ptr + (i * P + offs_p) * R + r, dS_r.to(dleft_ptr.dtype.element_ty),
                                     mask=mask_p)
                    else:
                        tl.store(dleft_ptr + (i * P + offs_p) * R + r, dS_r.to(dleft_ptr.dtype.element_ty),
                                 mask=mask_p)
                    s_r = tl.load(left_ptr + (i * P + offs_p) * R + r, mask=mask_p, other=0.0).to(tl.float32)
                    dT += tl.where(offs_r[:, None] == r, tl.sum(s_r[:, None] * dB, axis=0)[None, :], 0.0)
            else:
                tl.store(dleft_ptr + (i * P + offs_p[:, None]) * Q + offs_q[None, :],
                         dB.to(dleft_ptr.dtype.element_ty), mask=mask)
        if FACTORED:
            tl.store(dright_ptr + (i * R + offs_r[:, None]) * Q + offs_q[None, :],
                     dT.to(dright_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & mask_q[None, :])
    return dA


@triton.jit
def _bias_sum(csum_ptr, CS, S, offset, n, scale, out_ptr, BLOCK: tl.constexpr):
    for j0 in range(0, n, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, S):
            acc += tl.load(csum_ptr + s * CS + offset + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _store_rule_grad(drule_ptr, dA, i, N: tl.constexpr, NP: tl.constexpr):
    """Slice i (N, N) of a rule's gradient, from its (NP, NP) padded tile."""
    ra = tl.arange(0, NP)[:, None]
    rc = tl.arange(0, NP)[None, :]
    if i < N:
        tl.store(drule_ptr + (i * N + ra) * N + rc, dA.to(drule_ptr.dtype.element_ty), mask=(ra < N) & (rc < N))


@triton.jit
def _factor_grads_kernel(
    part_ptr, csum_ptr, S, split_stride, CS,
    # projection 1: its partials at part_ptr (row, col strides), its factors and their gradients
    s_row1, s_col1, rule1, left1, right1, drule1, dleft1, dright1, P1, Q1, rows1,
    # projection 2 (with TWO): at part_ptr + off2
    off2, s_row2, s_col2, rule2, left2, right2, drule2, dleft2, dright2, P2, Q2, rows2,
    dbias1, n_bias1, dbias2, off_bias2, n_bias2,
    # WIDE1 / WIDE2 factored: fp32 partial sums of d left over column chunks (projection 2's at off_acc2)
    dleft_acc, off_acc2,
    # GROUPED (mixed-task batches): the tasks' row counts, rows per split, and each parameter's
    # task stride (0 for a rule the tasks share: its gradient is summed over them)
    counts_ptr, T, rows_per_split, t_rule1, t_left1, t_right1, t_rule2, t_left2, t_right2, t_bias1, t_bias2,
    N1: tl.constexpr, R1: tl.constexpr, RP1: tl.constexpr, RULE1: tl.constexpr, FACT1: tl.constexpr,
    BP1: tl.constexpr, QC1: tl.constexpr, WIDE1: tl.constexpr,
    N2: tl.constexpr, R2: tl.constexpr, RP2: tl.constexpr, RULE2: tl.constexpr, FACT2: tl.constexpr,
    BP2: tl.constexpr, QC2: tl.constexpr, WIDE2: tl.constexpr,
    TWO: tl.constexpr, SHARED: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, NP: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1,
):
    """Program (i, chunk): slice i of each projection (rows chunk*rows..(chunk+1)*rows of B_i; a
    projection with a rule takes all its rows in chunk 0, as d rule and d right sum over them);
    program (0, 0) also sums the biases. SHARED: both projections share one rule, whose gradient
    (both contributions) goes to drule1. GROUPED: the same for each task in turn, from that
    task's splits (each task's rows cut into splits of rows_per_split, in task order), its
    parameters and gradients at t times their task strides.

    No value lives across a projection's loops unused: a rule's gradient is stored as soon as
    it is whole, and a sum that goes on (the shared rule's second contribution, a rule the
    tasks share) enters the next projection's loops as the sum they add to (ptxas keeps a value
    held across a loop that does not use it on the stack)."""
    i, chunk = tl.program_id(0), tl.program_id(1)
    tot1 = tl.zeros((NP, NP), tl.float32)  # d rule of a rule the tasks share, summed over them
    tot2 = tl.zeros((NP, NP), tl.float32)
    if GROUPED:
        tasks = tl.arange(0, TP)
        cnt = tl.load(counts_ptr + tasks, mask=tasks < T, other=0)
        splits = (cnt + rows_per_split - 1) // rows_per_split
        n_tasks = T
    else:
        n_tasks = 1
    for t in range(0, n_tasks):
        if GROUPED:
            s_lo = tl.sum(tl.where(tasks < t, splits, 0))
            S_t = tl.sum(tl.where(tasks == t, splits, 0))
        else:
            s_lo = 0
            S_t = S
        if i == 0:
            if chunk == 0:
                if HAS_B1:
                    _bias_sum(csum_ptr + s_lo * CS, CS, S_t, 0, n_bias1, 1.0, dbias1 + t * t_bias1, 256)
                if HAS_B2:
                    _bias_sum(csum_ptr + s_lo * CS, CS, S_t, off_bias2, n_bias2, 1.0, dbias2 + t * t_bias2, 256)
        part_t = part_ptr + s_lo * split_stride
        dA1 = tl.zeros((NP, NP), tl.float32)
        if GROUPED and t_rule1 == 0:
            dA1 = tot1
        if i < N1:
            p_lo = chunk * rows1
            if p_lo < P1:
                dA1 = _proj_grads(dA1, part_t, s_row1, s_col1, split_stride, S_t, rule1 + t * t_rule1,
                                  left1 + t * t_left1, right1 + t * t_right1, dleft1 + t * t_left1,
                                  dright1 + t * t_right1, dleft_acc, i, p_lo, tl.minimum(p_lo + rows1, P1), P1, Q1,
                                  N1, NP, R1, RP1, RULE1, FACT1, BP1, QC1, WIDE1)
        if RULE1 and not SHARED:
            if GROUPED and t_rule1 == 0:
                tot1 = dA1
            elif chunk == 0:
                _store_rule_grad(drule1 + t * t_rule1, dA1, i, N1, NP)
        if TWO:
            if SHARED:
                dA2 = dA1
            else:
                dA2 = tl.zeros((NP, NP), tl.float32)
                if GROUPED and t_rule2 == 0:
                    dA2 = tot2
            if i < N2:
                p_lo = chunk * rows2
                if p_lo < P2:
                    dA2 = _proj_grads(dA2, part_t + off2, s_row2, s_col2, split_stride, S_t, rule2 + t * t_rule2,
                                      left2 + t * t_left2, right2 + t * t_right2, dleft2 + t * t_left2,
                                      dright2 + t * t_right2, dleft_acc + off_acc2, i, p_lo,
                                      tl.minimum(p_lo + rows2, P2), P2, Q2, N2, NP, R2, RP2, RULE2, FACT2, BP2, QC2,
                                      WIDE2)
            if RULE2:
                if SHARED:  # the rule's whole gradient, to drule1
                    if GROUPED and t_rule1 == 0:
                        tot1 = dA2
                    elif chunk == 0:
                        _store_rule_grad(drule1 + t * t_rule1, dA2, i, N1, NP)
                elif GROUPED and t_rule2 == 0:
                    tot2 = dA2
                elif chunk == 0:
                    _store_rule_grad(drule2 + t * t_rule2, dA2, i, N2, NP)
    # A rule the tasks share: its gradient summed over them.
    if GROUPED and chunk == 0:
        if RULE1 and t_rule1 == 0:
            _store_rule_grad(drule1, tot1, i, N1, NP)
        if TWO and RULE2:
            if not SHARED and t_rule2 == 0:
                _store_rule_grad(drule2, tot2, i, N2, NP)


class GradsInput(NamedTuple):
    """One projection's factors as factor_grads takes them: (rule, left, right) with rule None for
    a dense (I, O) matrix (left); its dH's partials at ``offset`` in the partial buffer, element
    H[row, col] at row * s_row + col * s_col. For a mixed-task batch (factor_grads' ``grouping``)
    left and right (and the rule, or one shared by the tasks) carry the task dimension first."""
    rule: Optional[torch.Tensor]
    left: torch.Tensor
    right: Optional[torch.Tensor]
    offset: int
    s_row: int
    s_col: int


_NO_PROJECTION = ((1, 1, 1, False, False, 1, 1, False), 1, 1, 1, 1, (0, 0, 0))  # an absent second projection


@functools.lru_cache(maxsize=1024)  # computed once per shape (host time)
def _projection_plan(rule_shape, left_shape, right_shape, tasks: bool):
    """((N, R, RP, RULE, FACT, BP, QC, WIDE), P, Q, rows per program, programs along the rows, task
    strides (rule, left, right)) of one projection of _factor_grads_kernel, from its factors'
    shapes (None for an absent one); ``tasks``: the factors are stacked per task (a rule of 3
    dimensions shared by the tasks: stride 0)."""
    strides = (0, 0, 0)
    if tasks:
        strides = (0 if rule_shape is None or len(rule_shape) == 3 else math.prod(rule_shape[1:]),
                   math.prod(left_shape[1:]), 0 if right_shape is None else math.prod(right_shape[1:]))
        left_shape, right_shape = left_shape[1:], None if right_shape is None else right_shape[1:]
    fact = right_shape is not None
    if rule_shape is None:  # dense: dW = dH, as the slice of a rule-less N = 1 projection, split into row chunks
        (P, Q), N, R = left_shape, 1, 1
        BP, QC = config.grads_tile(P, Q)
        rows = BP
    else:
        N, P = rule_shape[-1], left_shape[1]
        R = left_shape[2] if fact else 1
        Q = right_shape[2] if fact else left_shape[2]
        BP, QC = config.grads_tile(P, Q)
        rows = P  # d rule and d right sum over every row of B_i: one program along them
    wide = pow2(Q) > QC  # rows in column chunks (a factored d left summed over them in memory)
    return (N, R, pow2(R), rule_shape is not None, fact, BP, QC, wide), P, Q, rows, cdiv(P, rows), strides


class FactorGradsPlan(NamedTuple):
    """What a factor_grads launch takes besides tensors (`factor_grads_plan`)."""
    grid: tuple
    strides1: tuple  # (s_row1, s_col1)
    dims1: tuple  # (P1, Q1, rows1)
    strides2: tuple  # (off2, s_row2, s_col2)
    dims2: tuple  # (P2, Q2, rows2)
    biases: tuple  # (n_bias1, off_bias2, n_bias2)
    dleft_acc: tuple  # (elements, off_acc2): the fp32 partial sums of a WIDE projection's d left
    task_strides: tuple  # (t_rule1, t_left1, t_right1, t_rule2, t_left2, t_right2, t_bias1, t_bias2)
    new_grads: tuple  # (d rule1, d right1, d rule2, d right2): whether each is computed
    tasks: int
    consts: dict


def _spec(pr: Optional[GradsInput]) -> Optional[tuple]:
    if pr is None:
        return None
    return (None if pr.rule is None else tuple(pr.rule.shape), tuple(pr.left.shape),
            None if pr.right is None else tuple(pr.right.shape), pr.offset, pr.s_row, pr.s_col)


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def factor_grads_plan(first: tuple, second: Optional[tuple] = None, bias1: Optional[tuple] = None,
                      bias2: Optional[tuple] = None, shared_rule: bool = False, T: int = 0) -> FactorGradsPlan:
    """factor_grads' launch from its projections' specs, `GradsInput`'s fields with shapes for
    tensors (None: no second projection), the biases' (shape, offset into csum, length) (None:
    absent) and T tasks (0: one, the factors not stacked per task)."""
    assert first[3] == 0, "the first projection's partials start the buffer"
    tasks = T > 0
    c1, P1, Q1, rows1, chunks1, t1 = _projection_plan(*first[:3], tasks)
    c2, P2, Q2, rows2, chunks2, t2 = _NO_PROJECTION if second is None else _projection_plan(*second[:3], tasks)
    off2, s_row2, s_col2 = (0, 0, 0) if second is None else second[3:]
    t_b = tuple(0 if b is None or not tasks else math.prod(b[0][1:]) for b in (bias1, bias2))
    n_i = max(c1[0], c2[0])
    warps, maxnreg = config.grads_warps(c1[3] or c2[3])
    names = ("N", "R", "RP", "RULE", "FACT", "BP", "QC", "WIDE")
    consts = dict(**{f"{k}1": v for k, v in zip(names, c1)}, **{f"{k}2": v for k, v in zip(names, c2)},
                  TWO=second is not None, SHARED=shared_rule, HAS_B1=bias1 is not None, HAS_B2=bias2 is not None,
                  NP=pow2(n_i), GROUPED=tasks, TP=max(2, pow2(T)),
                  num_warps=warps, maxnreg=maxnreg)
    acc1, acc2 = (c[0] * P * c[1] if c[4] and c[7] else 0 for c, P in ((c1, P1), (c2, P2)))
    new_grads = (first[0] is not None, first[0] is not None and first[2] is not None,
                 second is not None and second[0] is not None and not shared_rule,
                 second is not None and second[0] is not None and second[2] is not None)
    return FactorGradsPlan((n_i, max(chunks1, chunks2)), first[4:], (P1, Q1, rows1), (off2, s_row2, s_col2),
                           (P2, Q2, rows2), (0 if bias1 is None else bias1[2], 0 if bias2 is None else bias2[1],
                                             0 if bias2 is None else bias2[2]), (acc1 + acc2, acc1), t1 + t2 + t_b,
                           new_grads,
                           max(T, 1), consts)


def run_factor_grads(plan: FactorGradsPlan, partials: Partials, first: tuple, second: Optional[tuple] = None,
                     biases=(None, None), grouping=None):
    """factor_grads with its plan: ``first`` / ``second`` the projections' (rule, left, right)
    tensors, ``biases`` the biases' like-tensors (None: absent); ``grouping`` (counts,
    rows_per_split) for a mixed-task batch."""
    part, csum = partials.part, partials.csum
    new = plan.new_grads
    rule1, left1, right1 = first
    g1 = (torch.empty_like(rule1) if new[0] else None, torch.empty_like(left1),
          torch.empty_like(right1) if new[1] else None)
    if second is None:
        rule2 = left2 = right2 = part
        g2 = (None, None, None)
    else:
        rule2, left2, right2 = second
        g2 = (torch.empty_like(rule2) if new[2] else None, torch.empty_like(left2),
              torch.empty_like(right2) if new[3] else None)
    b1, b2 = biases
    db = (None if b1 is None else torch.empty_like(b1), None if b2 is None else torch.empty_like(b2))
    counts, rows_per_split = (part, 1) if grouping is None else grouping
    acc = empty((plan.dleft_acc[0],), dtype=torch.float32, device=part.device) if plan.dleft_acc[0] else part
    with LAUNCH_LOCK:
        _factor_grads_kernel[plan.grid](
            part, csum, part.shape[0], part.stride(0), csum.shape[1], *plan.strides1,
            part if rule1 is None else rule1, left1, part if right1 is None else right1,
            part if g1[0] is None else g1[0], g1[1], part if g1[2] is None else g1[2], *plan.dims1,
            *plan.strides2, part if rule2 is None else rule2, left2, part if right2 is None else right2,
            part if g2[0] is None else g2[0], part if g2[1] is None else g2[1], part if g2[2] is None else g2[2],
            *plan.dims2, part if db[0] is None else db[0], plan.biases[0], part if db[1] is None else db[1],
            *plan.biases[1:], acc, plan.dleft_acc[1], counts, plan.tasks, rows_per_split,
            *plan.task_strides, **plan.consts)
    return g1, g2, db


def factor_grads(partials: Partials, first: GradsInput, second: Optional[GradsInput] = None, *,
                 biases=(None, None), shared_rule: bool = False, grouping=None):
    """Every parameter gradient from a reduction's partials, in one launch: for each projection
    (d rule, d left, d right), None where a factor is absent; then (d bias1, d bias2) for the
    biases given as (like-tensor, offset into csum, length) or None. With shared_rule the rule's
    whole gradient is the first projection's d rule (the second's is None). Each gradient has
    its parameter's dtype and layout (contiguous). ``grouping`` (counts, T, rows_per_split): a
    mixed-task batch, whose partials hold each task's splits in task order and whose parameters
    (the biases' like-tensors too) are stacked per task."""
    plan = factor_grads_plan(_spec(first), _spec(second),
                             *(None if b is None else (tuple(b[0].shape), b[1], b[2]) for b in biases),
                             shared_rule, 0 if grouping is None else grouping[1])
    return run_factor_grads(plan, partials, first[:3], None if second is None else second[:3],
                            tuple(None if b is None else b[0] for b in biases),
                            None if grouping is None else (grouping[0], grouping[2]))
