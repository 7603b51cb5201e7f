"""Compile the Triton kernels ahead of time for a GPU arch (no GPU needed) and report what the
compiler produced: registers, stack (spills), shared memory, and the tensor-core instructions in
the SASS. The numbers that tune block sizes before any timing.

    python scripts/triton_resources.py --arch 90 [--dtype bf16|fp16|fp32] [--kernel fwd,bwd,cols] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch

from compacter_kernels.ops.triton import config, grads, kron
from compacter_kernels.ops.triton import adapter

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_ARGS = {"scale"}


# Pointer arguments whose names do not end in _ptr (the factor_grads and build_h kernels).
POINTERS = {"rule1", "left1", "right1", "drule1", "dleft1", "dright1", "rule2", "left2", "right2", "drule2",
            "dleft2", "dright2", "r1", "l1", "rg1", "h1", "r2", "l2", "rg2", "h2"}


def compile_kernel(kernel, constexprs: dict, dtype: str, arch: int, num_warps: int, num_stages: int = 3):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("order_ptr", "counts_ptr", "ids_ptr"):  # the row grouping of mixed-task batches (i64)
            sig[name] = "*i64"
        elif name.endswith("_ptr") or name in POINTERS:
            # partial sums and column sums are fp32 whatever the input dtype
            sig[name] = "*fp32" if name in ("part_ptr", "csum_ptr") else TYPES[dtype]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> dict:
    """REG, STACK (bytes of spill/stack per thread), SHARED, and tensor-core instruction counts."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    out = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    out["HGMMA"] = len(re.findall(r"\bHGMMA\.", sass))
    out["HMMA"] = len(re.findall(r"\bHMMA\.", sass))
    out["shared_dyn"] = compiled.metadata.shared
    return out


KERNELS = {"fwd": "_adapter_fwd_kernel", "bwd": "_adapter_rows_kernel", "cols": "_adapter_cols_kernel"}


def small_kernel_cases(kernel_name: str):
    """The kernels around the big three, at a Compacter adapter's shapes (d = 4096)."""
    if kernel_name == "grads":  # both projections of a factorised PHM adapter, shared rule, n = 4, rank 1
        for k in (24, 128):
            (bp1, qp1), (bp2, qp2) = config.grads_tile(4096 // 4, k // 4), config.grads_tile(k // 4, 4096 // 4)
            c = dict(N1=4, R1=1, RP1=1, RULE1=True, FACT1=True, BP1=bp1, QP1=qp1,
                     N2=4, R2=1, RP2=1, RULE2=True, FACT2=True, BP2=bp2, QP2=qp2,
                     TWO=True, SHARED=True, HAS_B1=True, HAS_B2=True, NP=4, GROUPED=False, TP=1)
            yield f"k={k} n=4 r=1 shared rule", grads._factor_grads_kernel, c, 4
            yield f"k={k} n=4 r=1 shared rule, 64 tasks", grads._factor_grads_kernel, {**c, "GROUPED": True,
                                                                                      "TP": 64}, 4
    elif kernel_name == "group":  # the row grouping of a mixed-task batch (one program)
        for tp in (2, 16, 64):
            yield f"{tp} tasks", adapter._group_rows_kernel, config.grouping_consts(tp), 8
    elif kernel_name == "build_h":
        c = dict(MODE1=kron.MODE_PHM_FACTORED, N1=8, R1=1, MODE2=kron.MODE_PHM_FACTORED, N2=8, R2=1, TWO=True,
                 BR=32, BC=32, GROUP=False, C=16, TP=2)
        yield "two projections n=8 r=1", kron._build_h_kernel, c, 4
        yield "two projections n=8 r=1, grouping 64 tasks", kron._build_h_kernel, {
            **c, "GROUP": True, **config.grouping_consts(64)}, 4
    elif kernel_name == "reduce":
        yield "phm_linear dH, BA=64 BB=128", grads._reduce_rows_kernel, dict(COLSUM=True, BA=64, BB=128, BM=64,
                                                                            IEEE=False), 8


def adapter_cases(kernel_name: str, dtype: str):
    """(label, kernel, constexprs, num_warps) at representative shapes, as the launchers pick them."""
    kernel = getattr(adapter, KERNELS[kernel_name])
    for k, n, r in [(24, 4, 1), (48, 4, 1), (128, 8, 1), (256, 8, 4)]:
        BM, BD, KP, warps = config.adapter_blocks(4096, k, DTYPES[dtype], backward=kernel_name != "fwd")
        inkernel = n * (r + 1) * KP <= config.INKERNEL_H_BUDGET
        mode, N, R = (kron.MODE_PHM_FACTORED, n, r) if inkernel else (kron.MODE_DENSE, 1, 1)
        if kernel_name == "cols":  # as adapter._columns launches it
            BA, BM, warps = config.columns_blocks(k)
            c = dict(MODE_D=mode, N_D=N, R_D=R, HAS_RES=False, BA=BA, BM=BM, KP=KP, IEEE=False, GROUPED=False, TP=1)
            yield f"k={k} n={n} r={r} {'in-kernel H' if inkernel else 'prebuilt H'} BA={BA} BM={BM}", kernel, c, warps
            if k == 24:
                yield f"k={k} n={n} r={r} 64 tasks grouped BA={BA} BM={BM}", kernel, {**c, "GROUPED": True, "TP": 64}, warps
            continue
        c = dict(MODE_U=mode, N_U=N, R_U=R, HAS_RES=False, ACT=0, BM=BM, BD=BD, KP=KP, IEEE=False, GROUPED=False, TP=1)
        if kernel_name == "bwd" and k == 24:
            for tp in (16, 64):
                yield f"k={k} n={n} r={r} {tp} tasks grouped BM={BM} BD={BD}", kernel, {**c, "GROUPED": True, "TP": tp}, warps
        if kernel_name == "fwd":
            c.update(MODE_D=mode, N_D=N, R_D=R, HAS_BD=True, HAS_BU=True, STORE_Z=True)
        yield f"k={k} n={n} r={r} {'in-kernel H' if inkernel else 'prebuilt H'} BM={BM} BD={BD}", kernel, c, warps
        if kernel_name == "fwd" and k == 24:  # a mixed-task batch of 64 tasks, no z (inference)
            c = {**c, "GROUPED": True, "TP": 64, "STORE_Z": False}
            yield f"k={k} n={n} r={r} 64 tasks grouped, no z BM={BM} BD={BD}", kernel, c, warps
    # A dense adapter on nn.Linear weights, read transposed (as AdapterHub's Houlsby passes them).
    BM, BD, KP, warps = config.adapter_blocks(4096, 128, DTYPES[dtype], backward=kernel_name != "fwd")
    T = dict(MODE_D=kron.MODE_DENSE_T, N_D=1, R_D=1, MODE_U=kron.MODE_DENSE_T, N_U=1, R_U=1)
    if kernel_name == "cols":
        BA, BM, warps = config.columns_blocks(128)
        c = dict(MODE_D=T["MODE_D"], N_D=1, R_D=1, HAS_RES=False, BA=BA, BM=BM, KP=KP, IEEE=False, GROUPED=False, TP=1)
    else:
        c = dict(MODE_U=T["MODE_U"], N_U=1, R_U=1, HAS_RES=False, ACT=0, BM=BM, BD=BD, KP=KP, IEEE=False,
                 GROUPED=False, TP=1)
        if kernel_name == "fwd":
            c.update(MODE_D=T["MODE_D"], N_D=1, R_D=1, HAS_BD=True, HAS_BU=True, STORE_Z=True)
    yield f"k=128 dense, nn.Linear weights transposed BM={BM}", kernel, c, warps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 or 90")
    p.add_argument("--dtype", default="bf16", choices=sorted(TYPES))
    p.add_argument("--kernel", default="fwd,bwd,cols,grads,build_h,reduce,group",
                   help="comma list of fwd, bwd (the rows kernel), cols, grads (factor_grads), build_h, reduce, "
                        "group (the rows of a mixed-task batch)")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout instead of the table")
    args = p.parse_args()
    rows = []
    for name in args.kernel.split(","):
        cases = adapter_cases(name, args.dtype) if name in KERNELS else small_kernel_cases(name)
        for label, kernel, c, warps in cases:
            if "IEEE" in c:
                c["IEEE"] = args.dtype == "fp32"
            r = resources(compile_kernel(kernel, c, args.dtype, args.arch, warps))
            rows.append(dict(kernel=name, case=label, warps=warps, **r))
            if not args.json:
                print(f"{name:4s} {label:40s} warps={warps} REG={r['REG']:3d} STACK={r['STACK']:5d} "
                      f"SHARED={r['shared_dyn']:6d} HGMMA={r['HGMMA']} HMMA={r['HMMA']}", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
