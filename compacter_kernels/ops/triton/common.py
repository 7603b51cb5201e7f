"""Pieces shared by the Triton ops: activations, the in-kernel Kronecker tile, the split-M
reduction, block-size table, and output allocation."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..autograd import transposed


# How an H is given: dense (I, O) matrix; full PHM weight B; factorised S @ T; a dense matrix
# stored transposed (the (O, I) contiguous weight of an nn.Linear, passed as weight.t()).
MODE_DENSE, MODE_PHM, MODE_PHM_FACTORED, MODE_DENSE_T = 0, 1, 2, 3

# Set to True (tests do) to fill every output with NaN before a kernel writes it, so a kernel
# that leaves part of an output unwritten cannot pass.
POISON = os.environ.get("COMPACTER_KERNELS_POISON", "0") == "1"


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


# Triton reads TRITON_INTERPRET when the kernels are decorated, at import: read once here too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


# Held around every launch in Triton's CPU interpreter, which patches module-level state while a
# kernel runs (two threads at once fail there); compiled launches need no lock.
LAUNCH_LOCK = threading.Lock() if interpreting() else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def num_programs_target(device_index: Optional[int]) -> int:
    """About two waves of programs on the GPU (a few on the CPU interpreter)."""
    if device_index is None:
        return 4
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> Optional[int]:
    i = t.get_device()  # -1 off the GPU; one call, cheaper than reading t.device twice (host time)
    return None if i < 0 else i


# Host-side integer helpers: triton.cdiv / triton.next_power_of_2 are ConstexprFunction objects,
# about 1.6 us a call, and a backward makes dozens of these calls.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded(n: int) -> int:
    """tl.dot needs every tile side >= 16, and tiles are powers of two."""
    return max(16, pow2(n))


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
    for i in tl.static_range(N):
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


# Building H tiles inside every program costs about n*(r+1) FMAs and loads per element of H per
# row block: affordable while n*(r+1)*tile_cols stays within this budget (T5-base: 4*2*32 = 256).
# Past it, H is built once per call (d*k elements, L2-resident) and read as a dense matrix.
# A prediction from counting, not yet a measurement: see benchmarks/NOTES.md.
INKERNEL_H_BUDGET = 256


def proj_key(rule, left, right):
    """What a projection's kernel constants depend on: None for a dense matrix ("T" stored
    transposed), else (n, r), r = 0 for the full B (no right factor)."""
    if rule is None:
        return "T" if transposed(left) else None
    return rule.shape[-1], 0 if right is None else left.shape[-1]


def prebuilds(key: Optional[tuple], tile_cols: int) -> bool:
    """Whether a PHM projection (`proj_key`) has its H built once per call (by build_h) rather
    than tile by tile inside every program: past INKERNEL_H_BUDGET (``tile_cols`` is the width of
    the H tiles a program builds per row block). Shapes only, so the fake impls decide alike."""
    return isinstance(key, tuple) and key[0] * (max(key[1], 1) + 1) * tile_cols > INKERNEL_H_BUDGET


def h_consts(key: Optional[tuple], prebuilt: bool) -> tuple[int, int, int]:
    """(MODE, N, R) of a projection (`proj_key`) in the kernels; prebuilt: its H is a dense matrix."""
    if key == "T":
        return MODE_DENSE_T, 1, 1
    if key is None or prebuilt:
        return MODE_DENSE, 1, 1
    n, r = key
    return (MODE_PHM, n, 1) if r == 0 else (MODE_PHM_FACTORED, n, r)


def h_ptrs(rule, left, right, H: Optional[torch.Tensor], dtype: torch.dtype) -> tuple:
    """(rule, left, right) pointers of a projection for the kernels, `h_consts`' order: a dense
    or prebuilt H three times; a dense matrix in another dtype than x's (autocast) is cast once
    here, not per program (keeping its layout, transposed or not).

    ``dtype`` is x's, the dtype of the tl.dot operands. The factors may be in another (fp32
    under autocast): the kernels read them as they are and build H tiles in fp32, rounded once
    to ``dtype`` before tl.dot; a dense or prebuilt H is passed in ``dtype``, rounded once.
    """
    if rule is None:
        H = left if left.dtype == dtype else left.to(dtype)  # preserve_format: the same strides
    if H is not None:
        return H, H, H
    return rule, left, left if right is None else right


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


def grouping_consts(T: int) -> dict:
    """The constexprs of `group_rows` for T tasks."""
    TP = max(2, pow2(T))
    return dict(C=max(16, 4096 // TP), TP=TP)


@triton.jit
def _build_h_kernel(r1, l1, rg1, h1, I1, O1, tiles1, r2, l2, rg2, h2, I2, O2,
                    t_r1, t_l1, t_rg1, t_r2, t_l2, t_rg2, ids_ptr, order_ptr, counts_ptr, M, T,
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
        _build_h_tile(r1 + t * t_r1, l1 + t * t_l1, rg1 + t * t_rg1, h1 + t * I1 * O1, pid, I1, O1, BR, BC, MODE1,
                      N1, R1)
    elif TWO:
        _build_h_tile(r2 + t * t_r2, l2 + t * t_l2, rg2 + t * t_rg2, h2 + t * I2 * O2, pid - tiles1, I2, O2, BR, BC,
                      MODE2, N2, R2)


def build_h(projections, dtype: torch.dtype, tasks: int = 0, grouping=None) -> list:
    """The H (I, O) in ``dtype`` of each (rule, left, right) of ``projections`` (one or two), in
    one launch. ``tasks`` T > 0: the factors are stacked per task (a rule of three dimensions
    shared by the tasks), and each H is (T, I, O). ``grouping`` (ids, order, counts): the same
    launch also groups a mixed-task batch's rows by task (`group_rows`), filling order and counts."""
    BR, BC = 32, 32
    args, strides, consts, hs, tiles = [], [], {}, [], []
    for j, (rule, left, right) in enumerate(projections, start=1):
        n = rule.shape[-1]
        I, O = n * left.shape[-2], n * (left if right is None else right).shape[-1]
        H = torch.empty((tasks, I, O) if tasks else (I, O), dtype=dtype, device=left.device)
        hs.append(H)
        tiles.append(cdiv(I, BR) * cdiv(O, BC))
        mode = MODE_PHM if right is None else MODE_PHM_FACTORED
        args.append((rule, left, left if right is None else right, H, I, O))
        strides.append((rule[0].numel() if tasks and rule.dim() == 4 else 0, left[0].numel() if tasks else 0,
                        (left if right is None else right)[0].numel() if tasks else 0))
        consts.update({f"MODE{j}": mode, f"N{j}": n, f"R{j}": 1 if right is None else left.shape[-1]})
    if len(projections) == 1:
        args.append(args[0])
        strides.append(strides[0])
        consts.update(MODE2=consts["MODE1"], N2=consts["N1"], R2=consts["R1"])
    if grouping is None:
        H = hs[0]
        rows_args, consts = (H, H, H, 0, 1), {**consts, "GROUP": False, "C": 16, "TP": 2}
    else:
        ids, order, counts = grouping
        rows_args, consts = (ids, order, counts, ids.shape[0], tasks), {**consts, "GROUP": True,
                                                                          **grouping_consts(tasks)}
    with LAUNCH_LOCK:
        _build_h_kernel[(sum(tiles) + (grouping is not None), max(1, tasks))](
            *args[0], tiles[0], *args[1], *strides[0], *strides[1], *rows_args, TWO=len(projections) == 2, BR=BR,
            BC=BC, **consts, num_warps=4)
    return hs


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
PARTIALS_BUDGET = 0.02


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


def split_rows(M: int, BM: int, tiles: int, bytes_per_split: int, floor_bytes: int, programs: int):
    """(splits, rows per split) of a reduction over rows: about ``programs`` programs in all,
    whole BM-row blocks per split, and never so many splits that the partials
    (``bytes_per_split`` each, written and read back) cost more than PARTIALS_BUDGET of
    ``floor_bytes``."""
    splits = max(1, min(cdiv(M, BM), cdiv(programs, tiles), int(PARTIALS_BUDGET * floor_bytes) // bytes_per_split))
    rows_per_split = cdiv(cdiv(M, splits), BM) * BM
    return max(1, cdiv(M, rows_per_split)), rows_per_split


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def _reduce_rows_plan(M: int, IA: int, IB: int, dtype: torch.dtype, colsum: bool, floor_bytes: int, reads: int,
                      programs: int):
    """(grid, rows per split, constexprs) of reduce_rows."""
    BB = min(padded(IB), 128)
    BA = min(padded(IA), 64 if BB > 64 else 128)
    BM = 32 if interpreting() else 64
    tiles = cdiv(IA, BA) * cdiv(IB, BB)
    splits, rows_per_split = split_rows(M, BM, tiles, IA * IB * 4 * (1 + reads), floor_bytes, programs)
    consts = dict(COLSUM=colsum, BA=BA, BB=BB, BM=BM, IEEE=dtype == torch.float32,
                  num_warps=8)  # 4 spill at BA=64, BB=128 on sm_80 (scripts/triton_resources.py)
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
def _proj_grads(part_ptr, s_row, s_col, split_stride, S, rule_ptr, left_ptr, right_ptr, dleft_ptr, dright_ptr,
                i, p_lo, p_hi, P, Q,
                N: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, HAS_RULE: tl.constexpr,
                FACTORED: tl.constexpr, BP: tl.constexpr, QP: tl.constexpr):
    """Gradients of slice i of one projection from the split partials of its dH (element
    H[row, col] of split s at part_ptr + s * split_stride + row * s_row + col * s_col), for the
    rows p_lo..p_hi of B_i. Stores d left[i] (d B_i, or d S_i = d B_i T_i^T) and d right[i]
    (d T_i = S_i^T d B_i, which needs every row: p_lo..p_hi must be all of them); returns
    d rule[i] (NP, NP) in fp32. Without a rule (a dense matrix: N = 1, rule = 1) d left is dH.

        dB_i[p, q]    = sum_{a,c} A[i, a, c] * dH[a*P + p, c*Q + q]
        dA[i, a, c]   = sum_{p,q} dH[a*P + p, c*Q + q] * B_i[p, q]
    """
    offs_q = tl.arange(0, QP)
    mask_q = offs_q < Q
    ra = tl.arange(0, NP)[:, None]
    rc = tl.arange(0, NP)[None, :]
    offs_r = tl.arange(0, RP)
    dA = tl.zeros((NP, NP), tl.float32)
    dT = tl.zeros((RP, QP), tl.float32)
    for p0 in range(p_lo, p_hi, BP):
        offs_p = p0 + tl.arange(0, BP)
        mask_p = offs_p < p_hi
        mask = mask_p[:, None] & mask_q[None, :]
        Bt = tl.zeros((BP, QP), tl.float32)
        if HAS_RULE:
            if FACTORED:
                for r in tl.static_range(R):
                    s_r = tl.load(left_ptr + (i * P + offs_p) * R + r, mask=mask_p, other=0.0).to(tl.float32)
                    t_r = tl.load(right_ptr + (i * R + r) * Q + offs_q, mask=mask_q, other=0.0).to(tl.float32)
                    Bt += s_r[:, None] * t_r[None, :]
            else:
                Bt = tl.load(left_ptr + (i * P + offs_p[:, None]) * Q + offs_q[None, :], mask=mask,
                             other=0.0).to(tl.float32)
        dB = tl.zeros((BP, QP), tl.float32)
        for a in tl.static_range(N):
            for c in tl.static_range(N):
                h = part_ptr + (a * P + offs_p[:, None]).to(tl.int64) * s_row + (c * Q + offs_q[None, :]) * s_col
                t = tl.zeros((BP, QP), tl.float32)
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
                tl.store(dleft_ptr + (i * P + offs_p) * R + r,
                         tl.sum(dB * t_r[None, :], axis=1).to(dleft_ptr.dtype.element_ty), mask=mask_p)
                s_r = tl.load(left_ptr + (i * P + offs_p) * R + r, mask=mask_p, other=0.0).to(tl.float32)
                dT += tl.where(offs_r[:, None] == r, tl.sum(s_r[:, None] * dB, axis=0)[None, :], 0.0)
        else:
            tl.store(dleft_ptr + (i * P + offs_p[:, None]) * Q + offs_q[None, :],
                     dB.to(dleft_ptr.dtype.element_ty), mask=mask)
    if FACTORED:
        tl.store(dright_ptr + (i * R + offs_r[:, None]) * Q + offs_q[None, :], dT.to(dright_ptr.dtype.element_ty),
                 mask=(offs_r[:, None] < R) & mask_q[None, :])
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
def _factor_grads_kernel(
    part_ptr, csum_ptr, S, split_stride, CS,
    # projection 1: its partials at part_ptr (row, col strides), its factors and their gradients
    s_row1, s_col1, rule1, left1, right1, drule1, dleft1, dright1, P1, Q1, rows1,
    # projection 2 (with TWO): at part_ptr + off2
    off2, s_row2, s_col2, rule2, left2, right2, drule2, dleft2, dright2, P2, Q2, rows2,
    db1_ptr, n_b1, db2_ptr, off_b2, n_b2,
    # GROUPED (mixed-task batches): the tasks' row counts, rows per split, and each parameter's
    # task stride (0 for a rule the tasks share: its gradient is summed over them)
    counts_ptr, T, rows_per_split, t_r1, t_l1, t_rg1, t_r2, t_l2, t_rg2, t_b1, t_b2,
    N1: tl.constexpr, R1: tl.constexpr, RP1: tl.constexpr, RULE1: tl.constexpr, FACT1: tl.constexpr,
    BP1: tl.constexpr, QP1: tl.constexpr,
    N2: tl.constexpr, R2: tl.constexpr, RP2: tl.constexpr, RULE2: tl.constexpr, FACT2: tl.constexpr,
    BP2: tl.constexpr, QP2: tl.constexpr,
    TWO: tl.constexpr, SHARED: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, NP: tl.constexpr,
    GROUPED: tl.constexpr = False, TP: tl.constexpr = 1,
):
    """Program (i, chunk): slice i of each projection (rows chunk*rows..(chunk+1)*rows of B_i; a
    projection with a rule takes all its rows in chunk 0, as d rule and d right sum over them);
    program (0, 0) also sums the biases. SHARED: both projections share one rule, whose gradient
    (both contributions) goes to drule1. GROUPED: the same for each task in turn, from that
    task's splits (each task's rows cut into splits of rows_per_split, in task order), its
    parameters and gradients at t times their task strides."""
    i, chunk = tl.program_id(0), tl.program_id(1)
    ra = tl.arange(0, NP)[:, None]
    rc = tl.arange(0, NP)[None, :]
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
        part_t = part_ptr + s_lo * split_stride
        dA1 = tl.zeros((NP, NP), tl.float32)
        if i < N1:
            p_lo = chunk * rows1
            if p_lo < P1:
                dA1 = _proj_grads(part_t, s_row1, s_col1, split_stride, S_t, rule1 + t * t_r1, left1 + t * t_l1,
                                  right1 + t * t_rg1, dleft1 + t * t_l1, dright1 + t * t_rg1, i, p_lo,
                                  tl.minimum(p_lo + rows1, P1), P1, Q1, N1, NP, R1, RP1, RULE1, FACT1, BP1, QP1)
        if TWO:
            dA2 = tl.zeros((NP, NP), tl.float32)
            if i < N2:
                p_lo = chunk * rows2
                if p_lo < P2:
                    dA2 = _proj_grads(part_t + off2, s_row2, s_col2, split_stride, S_t, rule2 + t * t_r2,
                                      left2 + t * t_l2, right2 + t * t_rg2, dleft2 + t * t_l2,
                                      dright2 + t * t_rg2, i, p_lo, tl.minimum(p_lo + rows2, P2), P2, Q2, N2, NP,
                                      R2, RP2, RULE2, FACT2, BP2, QP2)
            if RULE2:
                if SHARED:
                    dA1 += dA2
                elif t_r2 == 0:
                    tot2 += dA2
                elif chunk == 0:
                    if i < N2:
                        tl.store(drule2 + t * t_r2 + (i * N2 + ra) * N2 + rc, dA2.to(drule2.dtype.element_ty),
                                 mask=(ra < N2) & (rc < N2))
        if RULE1:
            if t_r1 == 0:
                tot1 += dA1
            elif chunk == 0:
                if i < N1:
                    tl.store(drule1 + t * t_r1 + (i * N1 + ra) * N1 + rc, dA1.to(drule1.dtype.element_ty),
                             mask=(ra < N1) & (rc < N1))
        if i == 0:
            if chunk == 0:
                if HAS_B1:
                    _bias_sum(csum_ptr + s_lo * CS, CS, S_t, 0, n_b1, 1.0, db1_ptr + t * t_b1, 256)
                if HAS_B2:
                    _bias_sum(csum_ptr + s_lo * CS, CS, S_t, off_b2, n_b2, 1.0, db2_ptr + t * t_b2, 256)
    if chunk == 0:
        if RULE1:
            if t_r1 == 0:
                if i < N1:
                    tl.store(drule1 + (i * N1 + ra) * N1 + rc, tot1.to(drule1.dtype.element_ty),
                             mask=(ra < N1) & (rc < N1))
        if TWO:
            if RULE2:
                if not SHARED:
                    if t_r2 == 0:
                        if i < N2:
                            tl.store(drule2 + (i * N2 + ra) * N2 + rc, tot2.to(drule2.dtype.element_ty),
                                     mask=(ra < N2) & (rc < N2))


class Projection(NamedTuple):
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


@functools.lru_cache(maxsize=1024)
def grads_tile(P: int, Q: int) -> tuple[int, int]:
    """(BP, QP): the rows and (padded) columns of B_i that a factor_grads program holds at once;
    1024 elements keep its tiles in registers (no spills on sm_80/sm_90: scripts/triton_resources.py)."""
    QP = pow2(Q)
    return max(1, min(pow2(P), 1024 // QP)), QP


_NO_PROJECTION = ((1, 1, 1, False, False, 1, 1), 1, 1, 1, 1, (0, 0, 0))  # an absent second projection


@functools.lru_cache(maxsize=1024)  # computed once per shape (host time)
def _projection_plan(rule_shape, left_shape, right_shape, tasks: bool):
    """((N, R, RP, RULE, FACT, BP, QP), P, Q, rows per program, programs along the rows, task
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
        BP, QP = grads_tile(P, Q)
        rows = BP
    else:
        N, P = rule_shape[-1], left_shape[1]
        R = left_shape[2] if fact else 1
        Q = right_shape[2] if fact else left_shape[2]
        BP, QP = grads_tile(P, Q)
        rows = P  # d rule and d right sum over every row of B_i: one program along them
    return (N, R, pow2(R), rule_shape is not None, fact, BP, QP), P, Q, rows, cdiv(P, rows), strides


class FactorGradsPlan(NamedTuple):
    """What a factor_grads launch takes besides tensors (`factor_grads_plan`)."""
    grid: tuple
    strides1: tuple  # (s_row1, s_col1)
    dims1: tuple  # (P1, Q1, rows1)
    strides2: tuple  # (off2, s_row2, s_col2)
    dims2: tuple  # (P2, Q2, rows2)
    biases: tuple  # (n_b1, off_b2, n_b2)
    task_strides: tuple  # (t_r1, t_l1, t_rg1, t_r2, t_l2, t_rg2, t_b1, t_b2)
    new_grads: tuple  # (d rule1, d right1, d rule2, d right2): whether each is computed
    tasks: int
    consts: dict


def _spec(pr: Optional[Projection]) -> Optional[tuple]:
    if pr is None:
        return None
    return (None if pr.rule is None else tuple(pr.rule.shape), tuple(pr.left.shape),
            None if pr.right is None else tuple(pr.right.shape), pr.offset, pr.s_row, pr.s_col)


@functools.lru_cache(maxsize=1024)  # computed once per key (host time)
def factor_grads_plan(first: tuple, second: Optional[tuple] = None, bias1: Optional[tuple] = None,
                      bias2: Optional[tuple] = None, shared_rule: bool = False, T: int = 0) -> FactorGradsPlan:
    """factor_grads' launch from its projections' specs, `Projection`'s fields with shapes for
    tensors (None: no second projection), the biases' (shape, offset into csum, length) (None:
    absent) and T tasks (0: one, the factors not stacked per task)."""
    assert first[3] == 0, "the first projection's partials start the buffer"
    tasks = T > 0
    c1, P1, Q1, rows1, chunks1, t1 = _projection_plan(*first[:3], tasks)
    c2, P2, Q2, rows2, chunks2, t2 = _NO_PROJECTION if second is None else _projection_plan(*second[:3], tasks)
    off2, s_row2, s_col2 = (0, 0, 0) if second is None else second[3:]
    t_b = tuple(0 if b is None or not tasks else math.prod(b[0][1:]) for b in (bias1, bias2))
    n_i = max(c1[0], c2[0])
    names = ("N", "R", "RP", "RULE", "FACT", "BP", "QP")
    consts = dict(**{f"{k}1": v for k, v in zip(names, c1)}, **{f"{k}2": v for k, v in zip(names, c2)},
                  TWO=second is not None, SHARED=shared_rule, HAS_B1=bias1 is not None, HAS_B2=bias2 is not None,
                  NP=pow2(n_i), GROUPED=tasks, TP=max(2, pow2(T)), num_warps=4)
    new_grads = (first[0] is not None, first[0] is not None and first[2] is not None,
                 second is not None and second[0] is not None and not shared_rule,
                 second is not None and second[0] is not None and second[2] is not None)
    return FactorGradsPlan((n_i, max(chunks1, chunks2)), first[4:], (P1, Q1, rows1), (off2, s_row2, s_col2),
                           (P2, Q2, rows2), (0 if bias1 is None else bias1[2], 0 if bias2 is None else bias2[1],
                                             0 if bias2 is None else bias2[2]), t1 + t2 + t_b, new_grads,
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
    with LAUNCH_LOCK:
        _factor_grads_kernel[plan.grid](
            part, csum, part.shape[0], part.stride(0), csum.shape[1], *plan.strides1,
            part if rule1 is None else rule1, left1, part if right1 is None else right1,
            part if g1[0] is None else g1[0], g1[1], part if g1[2] is None else g1[2], *plan.dims1,
            *plan.strides2, part if rule2 is None else rule2, left2, part if right2 is None else right2,
            part if g2[0] is None else g2[0], part if g2[1] is None else g2[1], part if g2[2] is None else g2[2],
            *plan.dims2, part if db[0] is None else db[0], plan.biases[0], part if db[1] is None else db[1],
            *plan.biases[1:], counts, plan.tasks, rows_per_split,
            *plan.task_strides, **plan.consts)
    return g1, g2, db


def factor_grads(partials: Partials, first: Projection, second: Optional[Projection] = None, *,
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
