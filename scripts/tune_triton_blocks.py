"""Time the fused Triton adapter ops over candidate block sizes, on a GPU.

`ops/triton/config.py::adapter_blocks` was read off the compiler (no spills), never timed. This times, per
shape, the forward op and the backward op (kernel 1 and its reductions) of a bf16 Compacter
adapter for each candidate (BM, BD, num_warps), with CUDA events after warm-up (the bench's
timer: median), checks each candidate's outputs against the current table's, and prints time,
fraction of the floor, registers and spills of the row-block kernel; `*` marks the current
choice, `best` the fastest correct spill-free candidate. One device command:

    python scripts/tune_triton_blocks.py [--m 32768] [--shapes 768x24,1024x32] [--ops fwd,bwd] [--seconds 500]

--smoke runs tiny sizes in Triton's CPU interpreter (a check of this script, not a timing).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from compacter_kernels.bench import cases, counts, timing  # noqa: E402
from compacter_kernels.ops.triton import config, launch  # noqa: E402
from compacter_kernels.ops.triton import adapter  # noqa: E402

TARGET_SHAPES = "768x24,768x48,1024x32,1024x64,4096x128,4096x256"
CANDIDATES = {  # (BM, BD, num_warps) tried per op
    "fwd": list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8))),
    "bwd": list(itertools.product((16, 32, 64), (32, 64, 128), (4, 8))),
}
SMOKE_CANDIDATES = [(16, 16, 4), (16, 32, 4)]


class Recorder:
    """Stands in for a @triton.jit kernel: launches it and keeps what the launch returned (the
    compiled kernel: registers and spills)."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiled = self.kernel[grid](*args, **kwargs)
            return self.compiled
        return launch


def blocks_fixed(BM: int, BD: int, warps: int):
    """A stand-in for config.adapter_blocks that returns one candidate."""
    def _blocks(d, k, dtype, backward=False):
        return BM, min(launch.padded(d), BD), launch.padded(k), warps
    return _blocks


def make_call(op: str, inputs: dict, dtype: torch.dtype):
    """(setup, run) for bench.timing.measure, and a function giving the op's outputs once."""
    rule, ld, rd, bd, lu, ru, bu = inputs["params"]
    xs, dys = inputs["xs"], inputs["dys"]
    order = itertools.cycle(range(len(xs)))

    def fwd(x):
        return adapter.adapter_fwd(x, None, rule, ld, rd, bd, rule, lu, ru, bu, None, "gelu", 1.0, dtype, True)

    if op == "fwd":
        return (lambda: xs[next(order)].detach()), fwd, (lambda: fwd(xs[0].detach()))
    saved = [fwd(x.detach())[1:] for x in xs]  # (z, H_down, H_up, order, counts) per input

    def bwd(i):
        return adapter.adapter_bwd(dys[i], xs[i].detach(), *saved[i], rule, ld, rd, bd, rule, lu, ru, bu, "gelu",
                                   1.0, False, True, False)

    return (lambda: next(order)), bwd, (lambda: bwd(0))


def same(outputs, expected) -> bool:
    """Outputs equal the current table's up to accumulation order (fp32 sums, bf16 rounding)."""
    for a, b in zip(outputs, expected):
        tol = 2e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-3
        if not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
            return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=32768, help="rows M (default 32768, where the targets are set)")
    p.add_argument("--shapes", default=TARGET_SHAPES, help=f"d x k list (default {TARGET_SHAPES})")
    p.add_argument("--ops", default="fwd,bwd", help="fwd, bwd or both (default)")
    p.add_argument("--seconds", type=float, default=500, help="stop starting new candidates after this long")
    p.add_argument("--smoke", action="store_true", help="tiny sizes in the Triton interpreter (CPU)")
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke)")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    M = 16 if args.smoke else args.m
    shapes = [(32, 8)] if args.smoke else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ops = args.ops.split(",")
    bw = timing.copy_bandwidth_gbps(device)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (smoke)'}: copy bandwidth {bw:.0f} GB/s, "
          f"M={M}, {str(dtype).replace('torch.', '')}")
    start = time.perf_counter()
    kernels = {"fwd": "_adapter_fwd_kernel", "bwd": "_adapter_rows_kernel"}
    for (d, k), op in itertools.product(shapes, ops):
        case = cases.Case("compacter", M, d, k, dtype=dtype)
        inputs = cases.make_inputs(case, device, 1 if args.smoke else cases.input_copies(case, device))
        floor_ms = counts.floor_bytes("compacter", op, M, d, k, torch.finfo(dtype).bits // 8) / (bw * 1e9) * 1e3
        setup, run, once = make_call(op, inputs, dtype)
        expected = once()
        current = config.adapter_blocks(d, k, dtype, backward=op == "bwd")
        print(f"\n{op} d={d} k={k}: floor {floor_ms:.4f} ms; current BM={current[0]} BD={current[1]} "
              f"warps={current[3]}")
        print(f"  {'BM':>4} {'BD':>4} {'warps':>5} {'ms':>9} {'floor':>6} {'regs':>5} {'spills':>6}")
        results = []
        for BM, BD, warps in SMOKE_CANDIDATES if args.smoke else CANDIDATES[op]:
            if time.perf_counter() - start > args.seconds:
                print(f"  stopped: --seconds {args.seconds:.0f} reached")
                break
            if (BM, min(launch.padded(d), BD), warps) in [r[:3] for r in results]:
                continue  # BD clamps to d: the same kernel as a candidate already timed
            recorder = Recorder(getattr(adapter, kernels[op]))
            saved = config.adapter_blocks, getattr(adapter, kernels[op])
            config.adapter_blocks = blocks_fixed(BM, BD, warps)
            setattr(adapter, kernels[op], recorder)
            try:
                ok = same(once(), expected)
                t = timing.measure(setup, run, device, warmup_ms=10, rep_ms=50).median_ms
                compiled = recorder.compiled
                regs = getattr(compiled, "n_regs", None)
                spills = getattr(compiled, "n_spills", None)
            except Exception as exc:  # noqa: BLE001  out of shared memory or registers: not a candidate
                print(f"  {BM:4d} {BD:4d} {warps:5d}  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            finally:
                config.adapter_blocks = saved[0]
                setattr(adapter, kernels[op], saved[1])
            mark = "*" if (BM, min(launch.padded(d), BD), warps) == (current[0], current[1], current[3]) else " "
            results.append((BM, min(launch.padded(d), BD), warps, t, ok, spills))  # spills None: not known
            regs, spills = ("-" if v is None else v for v in (regs, spills))
            print(f"{mark} {BM:4d} {BD:4d} {warps:5d} {t:9.4f} {floor_ms / t:6.0%} {regs:>5} {spills:>6}"
                  f"{'' if ok else '  WRONG: outputs differ'}")
        good = [r for r in results if r[4] and not r[5]]
        if good:
            BM, BD, warps, t, _, _ = min(good, key=lambda r: r[3])
            print(f"  best: BM={BM} BD={BD} warps={warps} {t:.4f} ms ({floor_ms / t:.0%} of the floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
