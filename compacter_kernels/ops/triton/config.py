"""Every tile rule and budget of the Triton kernels, in one place: what a launcher picks for a
shape, on a GPU and (small tiles) in the interpreter. The GPU sizes fit both sm_80 and sm_90:
within the shared memory of a block and with no registers spilled (but for 8-16 bytes of stack
that ptxas keeps in a few rows and columns configurations: benchmarks/NOTES.md), as
scripts/triton_sweep.py reads them off the compiler for every configuration the launchers pick
over the goal shapes (tests/test_triton_compile.py, on a sample); not yet tuned by timings on a
GPU.

    fused_fits          whether the fused adapter kernels take a bottleneck (FUSED_MAX_KP)
    adapter_blocks      the fused forward and the backward's rows kernel: (BM, BD, KP, warps)
    columns_blocks      the backward's columns kernel: (BA, BM, warps)
    reduce_rows_blocks  phm_linear's dH reduction: (BA, BB, BM, warps)
    matmul_blocks       phm_linear's product: (BM, BN, BK, warps)
    grads_tile          factor_grads: the rows and columns of B_i a program holds (GRADS_MAX_COLS)
    grads_warps         factor_grads: warps and registers for that tile
    BUILD_H_TILE        build_h: one (BR, BC) tile of H per program
    grouping_consts     the grouping of a mixed-task batch: ids read C at a time, TP tasks padded
    prebuilds           whether a projection's H is built once per call (INKERNEL_H_BUDGET)
    split_rows          how a reduction over rows splits them (PARTIALS_BUDGET)
"""

from __future__ import annotations

import functools
import importlib.metadata

import torch

from .launch import cdiv, interpreting, padded, pow2

# Triton 3.2 (torch 2.6) aborts compiling the 64-row fp16/bf16 forward for sm_90 (an assertion in
# its LinearLayout); 3.3 and later compile it (scripts/triton_sweep.py).
try:
    TRITON_VERSION = tuple(int(v) for v in importlib.metadata.version("triton").split(".")[:2])
except importlib.metadata.PackageNotFoundError:
    TRITON_VERSION = (0, 0)


# The fused adapter kernels hold a row block's whole bottleneck in registers (z in the forward,
# dg in the rows kernel, two (BA, KP) accumulators in the columns kernel) and stage (BD, KP) H
# tiles in shared memory. Past this padded width no tile fits an SM (sm_80 and sm_90, every dtype:
# the shared memory runs out at KP = 512, the registers before; scripts/triton_sweep.py), and the
# adapter runs as separate matmuls (the op's differentiable math), which are compute-bound there.
FUSED_MAX_KP = 256


def fused_fits(k: int) -> bool:
    """Whether the fused adapter kernels take a bottleneck of width k (`FUSED_MAX_KP`)."""
    return padded(k) <= FUSED_MAX_KP


@functools.lru_cache(maxsize=1024)  # pure, and read on every call
def adapter_blocks(d: int, k: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BM, BD, KP, num_warps) of the fused forward (and, ``backward``, the rows kernel): BM rows
    per program, d in BD chunks, the bottleneck padded to KP; small in the interpreter."""
    KP = padded(k)
    if interpreting():
        return 16, min(padded(d), 32), KP, 4
    fp32 = dtype == torch.float32  # IEEE products: fp32 tiles and more registers per element
    BM = 32 if backward or KP > 128 or fp32 or TRITON_VERSION < (3, 3) else 64
    if fp32 and KP >= 256:
        BM = 16
    # a wide (BM, KP) accumulator leaves less room per d chunk
    BD = 32 if fp32 or BM * KP >= 64 * 128 else 64
    return BM, min(padded(d), BD), KP, 8


def columns_blocks(K: int, e: int) -> tuple[int, int, int]:
    """(BA, BM, num_warps) of the columns kernel: BA columns of d per program, BM rows at a time.
    It holds two (BA, KP) fp32 accumulators, a (KP, BA) H tile and (BM, KP) tiles of g and dz:
    at most 2048 elements per accumulator for fp16/bf16, 1024 for fp32 (whose tiles are twice
    the size), and half the rows from KP = 256 (128 for fp32), or sm_80 spills. e: bytes per
    element of x."""
    KP = padded(K)
    if e == 4:
        return max(16, min(32, 1024 // KP)), 32 if KP < 128 else 16, 8
    return max(16, min(64, 2048 // KP)), 32 if KP < 256 else 16, 8


def reduce_rows_blocks(IA: int, IB: int, e: int) -> tuple[int, int, int, int]:
    """(BA, BB, BM, num_warps) of reduce_rows' (BA, BB) tiles of a^T @ b, BM rows at a time, for
    e-byte inputs (fp32's IEEE products hold more registers: quarter tiles, or sm_80 spills)."""
    if e == 4:
        return min(padded(IA), 32), min(padded(IB), 64), 32, 8
    BB = min(padded(IB), 128)
    BA = min(padded(IA), 64 if BB > 64 else 128)
    return BA, BB, 32 if interpreting() else 64, 8  # 4 warps spill at BA=64, BB=128 on sm_80


def matmul_blocks(KRED: int, NOUT: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) of phm_linear's product x (M, KRED) @ H (KRED, NOUT); fp32 in
    half the columns and depth (its IEEE product spills on sm_80 at BN = 128, BK = 64)."""
    fp32 = dtype == torch.float32
    BM = 16 if interpreting() else (32 if fp32 else 64)
    BN = min(padded(NOUT), 32 if interpreting() else (64 if fp32 else 128))
    BK = min(padded(KRED), 32 if interpreting() or fp32 else 64)
    return BM, BN, BK, 4


# Building H tiles inside every program costs about n*(r+1) FMAs and loads per element of H per
# row block: affordable while n*(r+1)*tile_cols stays within this budget (T5-base: 4*2*32 = 256).
# Past it, H is built once per call (d*k elements, L2-resident) and read as a dense matrix.
# A prediction from counting, not yet a measurement: see benchmarks/NOTES.md.
INKERNEL_H_BUDGET = 256


def prebuilds(n: int, r: int, tile_cols: int) -> bool:
    """Whether a PHM projection of n factors of rank r (1 for a full B) has its H built once per
    call (by build_h) rather than tile by tile inside every program: past INKERNEL_H_BUDGET
    (``tile_cols`` is the width of the H tiles a program builds per row block)."""
    return n * (r + 1) * tile_cols > INKERNEL_H_BUDGET


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


# The widest chunk of a row of B_i that factor_grads holds at once (`grads_tile`): 8 warps hold
# four fp32 (1, 2048) tiles and d right's (R, 2048) in registers; rows of 4096 columns at once
# took 16 warps, whose 128 registers a thread spilled up to 104 B (d = 5120, n = 2, r = 4), and
# wider rows spilled at any width (768 B at 8192 columns).
GRADS_MAX_COLS = 2048


@functools.lru_cache(maxsize=1024)
def grads_tile(P: int, Q: int) -> tuple[int, int]:
    """(BP, QC): the rows and (padded) columns of B_i that a factor_grads program holds at once:
    1024 elements, or one row in chunks of up to GRADS_MAX_COLS columns where Q is wider."""
    QC = min(pow2(Q), GRADS_MAX_COLS)
    return max(1, min(pow2(P), 1024 // QC)), QC


def grads_warps(rule: bool) -> tuple[int, int]:
    """(num_warps, maxnreg) of factor_grads: 8 warps (with 4, ptxas kept long-lived values on the
    stack) and the registers ptxas may use per thread. Left to itself ptxas kept values on the
    stack in a quarter of the configurations (8-768 B; half of them at 128 registers, or 64 at 16
    warps: half the register file per block), so it gets a budget (none left: scripts/triton_sweep.py):
    with a rule the grid is one program per slice (n <= 16 programs, one block per SM), which
    may take the whole register file; dense matrices (a program per chunk of rows, many) half
    of it, two blocks per SM."""
    return 8, 255 if rule else 128


def grouping_consts(T: int) -> dict:
    """The constexprs of `group_rows` for T tasks."""
    TP = max(2, pow2(T))
    return dict(C=max(16, 4096 // TP), TP=TP)


BUILD_H_TILE = (32, 32)
