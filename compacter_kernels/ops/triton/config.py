"""Every tile rule and budget of the Triton kernels, in one place: what a launcher picks for a
shape, on a GPU and (small tiles) in the interpreter. The GPU sizes are the largest whose sm_90
compile spills no registers, read off the compiler with scripts/triton_resources.py (table in
benchmarks/NOTES.md); not yet tuned by timings on a GPU.

    adapter_blocks      the fused forward and the backward's rows kernel: (BM, BD, KP, warps)
    columns_blocks      the backward's columns kernel: (BA, BM, warps)
    reduce_rows_blocks  phm_linear's dH reduction: (BA, BB, BM, warps)
    matmul_blocks       phm_linear's product: (BM, BN, BK, warps)
    grads_tile          factor_grads: the rows and columns of B_i a program holds
    BUILD_H_TILE        build_h: one (BR, BC) tile of H per program
    grouping_consts     the grouping of a mixed-task batch: ids read C at a time, TP tasks padded
    prebuilds           whether a projection's H is built once per call (INKERNEL_H_BUDGET)
    split_rows          how a reduction over rows splits them (PARTIALS_BUDGET)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .launch import cdiv, interpreting, padded, pow2


@functools.lru_cache(maxsize=1024)  # pure, and read on every call
def adapter_blocks(d: int, k: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BM, BD, KP, num_warps) of the fused forward (and, ``backward``, the rows kernel): BM rows
    per program, d in BD chunks, the bottleneck padded to KP; small in the interpreter."""
    KP = padded(k)
    if interpreting():
        return 16, min(padded(d), 32), KP, 4
    BM = 32 if backward or KP > 128 or dtype == torch.float32 else 64
    BD = 32 if BM * KP >= 64 * 128 else 64  # a wide (BM, KP) accumulator leaves less room per d chunk
    return BM, min(padded(d), BD), KP, 8


def columns_blocks(K: int) -> tuple[int, int, int]:
    """(BA, BM, num_warps) of the columns kernel: BA columns of d per program, two (BA, KP) fp32
    accumulators."""
    return max(16, min(128, 4096 // padded(K))), 32, 8


def reduce_rows_blocks(IA: int, IB: int) -> tuple[int, int, int, int]:
    """(BA, BB, BM, num_warps) of reduce_rows' (BA, BB) tiles of a^T @ b, BM rows at a time."""
    BB = min(padded(IB), 128)
    BA = min(padded(IA), 64 if BB > 64 else 128)
    return BA, BB, 32 if interpreting() else 64, 8  # 4 warps spill at BA=64, BB=128 on sm_80


def matmul_blocks(KRED: int, NOUT: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) of phm_linear's product x (M, KRED) @ H (KRED, NOUT)."""
    BM = 16 if interpreting() else (32 if dtype == torch.float32 else 64)
    BN = min(padded(NOUT), 32 if interpreting() else 128)
    BK = min(padded(KRED), 32 if interpreting() else 64)
    return BM, BN, BK, 4


# Building H tiles inside every program costs about n*(r+1) FMAs and loads per element of H per
# row block: affordable while n*(r+1)*tile_cols stays within this budget (T5-base: 4*2*32 = 256).
# Past it, H is built once per call (d*k elements, L2-resident) and read as a dense matrix.
# A prediction from counting, not yet a measurement: see benchmarks/NOTES.md.
INKERNEL_H_BUDGET = 256


def prebuilds(key: Optional[tuple], tile_cols: int) -> bool:
    """Whether a PHM projection (`proj_key`) has its H built once per call (by build_h) rather
    than tile by tile inside every program: past INKERNEL_H_BUDGET (``tile_cols`` is the width of
    the H tiles a program builds per row block). Shapes only, so the fake impls decide alike."""
    return isinstance(key, tuple) and key[0] * (max(key[1], 1) + 1) * tile_cols > INKERNEL_H_BUDGET


# The most bytes the partial sums may cost, as a fraction of the least traffic of the backward.
PARTIALS_BUDGET = 0.02


def split_rows(M: int, BM: int, tiles: int, bytes_per_split: int, floor_bytes: int, programs: int):
    """(splits, rows per split) of a reduction over rows: about ``programs`` programs in all,
    whole BM-row blocks per split, and never so many splits that the partials
    (``bytes_per_split`` each, written and read back) cost more than PARTIALS_BUDGET of
    ``floor_bytes``."""
    splits = max(1, min(cdiv(M, BM), cdiv(programs, tiles), int(PARTIALS_BUDGET * floor_bytes) // bytes_per_split))
    rows_per_split = cdiv(cdiv(M, splits), BM) * BM
    return max(1, cdiv(M, rows_per_split)), rows_per_split


@functools.lru_cache(maxsize=1024)
def grads_tile(P: int, Q: int) -> tuple[int, int]:
    """(BP, QP): the rows and (padded) columns of B_i that a factor_grads program holds at once;
    1024 elements keep its tiles in registers (no spills on sm_80/sm_90: scripts/triton_resources.py)."""
    QP = pow2(Q)
    return max(1, min(pow2(P), 1024 // QP)), QP


def grouping_consts(T: int) -> dict:
    """The constexprs of `group_rows` for T tasks."""
    TP = max(2, pow2(T))
    return dict(C=max(16, 4096 // TP), TP=TP)


BUILD_H_TILE = (32, 32)
