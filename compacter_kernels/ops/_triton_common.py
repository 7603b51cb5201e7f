"""Pieces shared by the Triton ops: activations, the in-kernel Kronecker tile, the split-M
reduction, block-size table, and output allocation."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import dense_h

# How an H is given: dense (I, O) matrix; full PHM weight B; factorised S @ T.
MODE_DENSE, MODE_PHM, MODE_PHM_FACTORED = 0, 1, 2

# Set to True (tests do) to fill every output with NaN before a kernel writes it, so a kernel
# that leaves part of an output unwritten cannot pass.
POISON = os.environ.get("COMPACTER_KERNELS_POISON", "0") == "1"


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    return t.device.index if t.device.type == "cuda" else None


def padded(n: int) -> int:
    """tl.dot needs every tile side >= 16, and tiles are powers of two."""
    return max(16, triton.next_power_of_2(n))


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
    left[i] @ right[i] (MODE_PHM_FACTORED); MODE_DENSE reads a contiguous (I, O) matrix.
    Nothing of H is written to memory.
    """
    if MODE == 0:
        return tl.load(left_ptr + ri * O + ci, mask=mask, other=0.0).to(tl.float32)
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


def h_args(rule, left, right, tile_cols: int, dtype: torch.dtype):
    """(rule_ptr, left_ptr, right_ptr, MODE, N, R) of one projection; rule None = dense.

    ``tile_cols`` is the width of the H tiles a program builds per row block (the cost model).
    ``dtype`` is x's, the dtype of the tl.dot operands. The factors may be in another (fp32
    under autocast): the kernels read them as they are and build H tiles in fp32, rounded once
    to ``dtype`` before tl.dot; a dense or prebuilt H is passed in ``dtype``, rounded once.
    """
    n, r = (0, 0) if rule is None else (rule.shape[0], 1 if right is None else left.shape[2])
    if rule is None or n * (r + 1) * tile_cols > INKERNEL_H_BUDGET:
        # In the compute dtype: the kernels round their tiles to it before tl.dot anyway, and every
        # program re-reads H (a dense matrix in another dtype is cast once here, not per program).
        H = dense_h(rule, left, right, dtype)
        return H, H, H, MODE_DENSE, 1, 1
    rule, left = rule.contiguous(), left.contiguous()
    if right is None:
        return rule, left, left, MODE_PHM, n, 1
    return rule, left, right.contiguous(), MODE_PHM_FACTORED, n, r


# ---- A^T @ B over rows, split over M with per-program partial sums -------------------------------

@triton.jit
def _rows_tn_kernel(a_ptr, b_ptr, out_ptr, colsum_ptr, M, IA, IB, sa, sb, rows_per_split,
                    COLSUM: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr,
                    IEEE: tl.constexpr):
    """out[s] = A[rows of split s]^T @ B[rows of split s]  (IA, IB), fp32; and column sums of B."""
    pid_a, pid_b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_a = pid_a * BA + tl.arange(0, BA)
    offs_b = pid_b * BB + tl.arange(0, BB)
    acc = tl.zeros((BA, BB), tl.float32)
    csum = tl.zeros((BB,), tl.float32)
    m_start = split * rows_per_split
    for m0 in range(m_start, tl.minimum(m_start + rows_per_split, M), BM):
        offs_m = (m0 + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < tl.minimum(m_start + rows_per_split, M)
        at = tl.load(a_ptr + offs_m[:, None] * sa + offs_a[None, :],
                     mask=mask_m[:, None] & (offs_a[None, :] < IA), other=0.0)
        bt = tl.load(b_ptr + offs_m[:, None] * sb + offs_b[None, :],
                     mask=mask_m[:, None] & (offs_b[None, :] < IB), other=0.0)
        bt_ = bt.to(at.dtype)  # B may be wider than A (the fp32 dy of an autocast forward)
        if IEEE:
            acc += tl.dot(tl.trans(at), bt_, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(at), bt_)
        if COLSUM:
            csum += tl.sum(bt.to(tl.float32), axis=0)
    out = out_ptr + split.to(tl.int64) * IA * IB + offs_a[:, None] * IB + offs_b[None, :]
    tl.store(out, acc, mask=(offs_a[:, None] < IA) & (offs_b[None, :] < IB))
    if COLSUM:
        if pid_a == 0:
            tl.store(colsum_ptr + split * IB + offs_b, csum, mask=offs_b < IB)


def rows_tn(a: torch.Tensor, b: torch.Tensor, colsum: bool):
    """(A^T @ B in fp32, column sums of B in fp32 or None) for 2-D a (M, IA), b (M, IB).

    Deterministic: each program reduces its own slice of rows; the slices are summed after.
    """
    M, IA = a.shape
    IB = b.shape[1]
    BB = min(padded(IB), 128)
    BA = min(padded(IA), 64 if BB > 64 else 128)
    BM = 32 if interpreting() else 64
    tiles = triton.cdiv(IA, BA) * triton.cdiv(IB, BB)
    splits = max(1, min(triton.cdiv(M, BM), triton.cdiv(num_programs_target(device_index(a)), tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, rows_per_split)
    part = empty((splits, IA, IB), dtype=torch.float32, device=a.device)
    csum = empty((splits, IB), dtype=torch.float32, device=a.device) if colsum else part
    with LAUNCH_LOCK:
        _rows_tn_kernel[(triton.cdiv(IA, BA), triton.cdiv(IB, BB), splits)](
            a, b, part, csum, M, IA, IB, a.stride(0), b.stride(0), rows_per_split,
            COLSUM=colsum, BA=BA, BB=BB, BM=BM, IEEE=a.dtype == torch.float32, num_warps=4)
    return part.sum(0), (csum.sum(0) if colsum else None)
