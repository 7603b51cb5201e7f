"""The command line: parse, run the sweep (or the end-to-end case), report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..reference import ACTIVATIONS
from . import cases, counts, e2e, report, timing
from .cases import PRESETS, PROVIDERS, Case, Shape

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _list_of(parse: Callable[[str], object]) -> Callable[[str], list]:
    """Parser of a comma-separated list, each item parsed by ``parse``."""
    def parse_list(s: str) -> list:
        items = [v.strip() for v in s.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        return list(dict.fromkeys(parse(v) for v in items))
    return parse_list


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(s: str) -> str:
        if s not in choices:
            raise argparse.ArgumentTypeError(f"unknown {s!r} (choose from {', '.join(choices)})")
        return s
    return parse


def _dtype(s: str) -> torch.dtype:
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[s]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compacter-bench",
        description="Benchmark the Compacter / Houlsby adapter and PHM linear ops against the eager "
                    "reference, torch.compile and the memory floor. Lists are comma-separated.",
        epilog="Default: the full sweep on a GPU, --quick on a CPU. Examples: "
               "`compacter-bench --preset llm-4096 --modes fwd`, `compacter-bench --m 4096 --d 1024 --k 32`, "
               "`compacter-bench --e2e --model t5-base`.")
    p.add_argument("--preset", type=_one_of(tuple(PRESETS)), help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    p.add_argument("--m", type=_list_of(_positive_int), help="rows M, e.g. 1,1024,65536 (default: the preset's)")
    p.add_argument("--d", type=_list_of(_positive_int), help="model widths d (default: the preset's)")
    p.add_argument("--k", type=_list_of(_positive_int), help="bottlenecks k (default: the preset's, or d/32)")
    p.add_argument("--n", type=_positive_int, default=4, help="phm_dim (default 4)")
    p.add_argument("--rank", type=_positive_int, default=1, help="rank of W_left @ W_right (default 1)")
    p.add_argument("--dtype", type=_list_of(_dtype), help="bf16, fp16, fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ops", type=_list_of(_one_of(counts.OPS)), default=list(counts.OPS),
                   help=f"of {', '.join(counts.OPS)} (default: all)")
    p.add_argument("--modes", type=_list_of(_one_of(counts.MODES)), default=list(counts.MODES),
                   help=f"of {', '.join(counts.MODES)} (default: all)")
    p.add_argument("--providers", type=_list_of(_one_of(PROVIDERS)), default=list(PROVIDERS),
                   help=f"of {', '.join(PROVIDERS)} (default: all)")
    p.add_argument("--activation", type=_one_of(ACTIVATIONS), default="gelu", help=f"of {', '.join(ACTIVATIONS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (default bench-results)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per measurement (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed budget per measurement (default 100)")
    p.add_argument("--compile-static", action="store_true",
                   help="torch.compile once per shape (dynamic=False) instead of once per sweep over M")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for torch (default: 1 on a CPU, steadier timings; torch's with a GPU)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--plot-json", type=Path, metavar="JSON",
                   help="time nothing: draw the PNGs of a results JSON this command wrote, next to it")
    p.add_argument("--multitask", action="store_true",
                   help="mixed-task batches, T = 1, 4, 16, 64: one fused call against a per-task loop (launches, "
                        "host time; GPU time on a GPU)")
    p.add_argument("--host", action="store_true",
                   help="host time per call with the kernel launches stubbed, ours beside the eager reference and a "
                        "bare autograd.Function (any machine; a benchmark of dispatch, not of kernels)")
    g = p.add_argument_group("end to end (--e2e): training steps of a frozen encoder with Compacter adapters")
    g.add_argument("--e2e", action="store_true", help="run the end-to-end case instead of the op sweep")
    g.add_argument("--model", type=_one_of(tuple(e2e.MODELS)), default="bert-base",
                   help=f"of {', '.join(e2e.MODELS)} (default bert-base)")
    g.add_argument("--layers", type=_positive_int, help="encoder layers (default: 2 on CPU, 12 on GPU)")
    g.add_argument("--batch", type=_positive_int, help="sequences per batch (default: 2 on CPU, 32 on GPU)")
    g.add_argument("--seq", type=_positive_int, help="tokens per sequence (default: 64 on CPU, 128 on GPU)")
    g.add_argument("--steps", type=_positive_int, help="timed steps (default: 5 on CPU, 20 on GPU)")
    g.add_argument("--no-compile", dest="e2e_compile", action="store_false",
                   help="skip each backend's compiled variant (torch.compile(fullgraph=True), mode='reduce-overhead' "
                        "on a GPU)")
    return p


def _shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Shape]:
    preset_shapes, _ = PRESETS[args.preset]
    if args.d:  # k defaults to the paper's reduction 32, rounded to a multiple of n
        shapes = [Shape("custom", d, k) for d in args.d for k in (args.k or [max(args.n, d // 32 // args.n * args.n)])]
    else:
        shapes = [Shape(s.model, s.d, k) for s in preset_shapes for k in (args.k or [s.k])]
    if {"compacter", "phm_linear"} & set(args.ops):
        for s in shapes:
            if s.d % args.n or s.k % args.n:
                parser.error(f"d={s.d} and k={s.k} must be multiples of --n {args.n} for the PHM ops")
    return list(dict.fromkeys(shapes))


def _counted_bytes(case: Case, mode: str, provider: str, device: torch.device) -> Optional[int]:
    """What the triton adapter kernels move, by the byte model tests/test_traffic.py checks
    against the interpreter's counts; None for the other providers and ops (not counted)."""
    if provider != "triton" or case.op == "phm_linear":
        return None
    try:
        from ..ops.triton import adapter, launch
    except ImportError:  # no triton: no such provider either
        return None
    e = torch.finfo(case.dtype).bits // 8
    n = case.n if case.op == "compacter" else 1
    programs = launch.num_programs_target(device.index if device.type == "cuda" else None)
    return sum(adapter.counted_bytes(case.M, case.d, case.k, e, n, backward=m == "bwd", programs=programs)
               for m in (("fwd", "bwd") if mode == "fwd+bwd" else (mode,)))


def _base_row(case: Case, mode: str, provider: str, device: Optional[torch.device] = None) -> dict:
    e = torch.finfo(case.dtype).bits // 8
    return {"op": case.op, "mode": mode, "provider": provider, "model": case.model, "d": case.d, "k": case.k,
            "n": case.n, "rank": case.rank, "dtype": str(case.dtype).replace("torch.", ""), "M": case.M,
            "activation": case.activation, "status": "ok", "reason": "", "median_ms": None, "p20_ms": None,
            "p80_ms": None, "reps": None, "peak_mib": None, "saved_mib": None, "saved_total_mib": None,
            "floor_bytes": counts.floor_bytes(case.op, mode, case.M, case.d, case.k, e),
            "counted_bytes": None if device is None else _counted_bytes(case, mode, provider, device),
            "flops": counts.flops(case.op, mode, case.M, case.d, case.k)}


def sweep(args: argparse.Namespace, shapes: list[Shape], device: torch.device,
          bw_gbps: float) -> tuple[list[dict], bool]:
    """(rows, interrupted): a Ctrl-C (or `timeout -s INT`) ends the sweep with what it measured."""
    skip = {p: cases.skip_reason(p, device) for p in args.providers}
    timed = [p for p in args.providers if p != "floor"]
    todo = [(dtype, shape, op, M) for dtype in args.dtype for shape in shapes for op in args.ops for M in args.m]
    progress = timing.Progress(len(todo) * len(args.modes) * len([p for p in timed if not skip[p]]))
    rows: list[dict] = []
    interrupted = False
    try:
        _sweep(args, todo, skip, timed, device, bw_gbps, progress, rows)
    except KeyboardInterrupt:
        interrupted = True
        if rows and rows[-1]["status"] == "ok" and rows[-1]["median_ms"] is None:  # the case cut short
            rows[-1].update(status="skipped", reason="interrupted")
    progress.close()
    if interrupted:
        done = sum(r["median_ms"] is not None for r in rows if r["provider"] != "floor")
        print(f"interrupted: reporting the {done} timings made so far")
    return rows, interrupted


def _sweep(args, todo, skip, timed, device, bw_gbps, progress, rows: list[dict]) -> None:
    """Appends a row per (case, mode, provider) to ``rows`` as it goes, so an interrupt keeps them."""
    broken: dict[str, str] = {}  # provider -> why it is skipped for the rest of the run
    fns: dict[str, Callable] = {}
    group = None
    for dtype, shape, op, M in todo:
        case = Case(op, M, shape.d, shape.k, args.n, args.rank, dtype, args.activation, shape.model)
        if args.compile_static or group != (dtype, shape, op):
            # dynamo caches graphs per function with a recompile limit: start each group afresh.
            torch._dynamo.reset()
            fns.clear()
            group = (dtype, shape, op)
        inputs = None
        saved: dict[str, timing.SavedBytes] = {}  # per provider: every mode runs the same forward
        for mode in args.modes:
            if "floor" in args.providers:
                row = _base_row(case, mode, "floor")
                t = row["floor_bytes"] / (bw_gbps * 1e9) * 1e3
                rows.append({**row, "median_ms": t, "p20_ms": t, "p80_ms": t, "reason": "floor bytes / copy bandwidth"})
            for provider in timed:
                row = _base_row(case, mode, provider, device)
                rows.append(row)
                if skip[provider] or provider in broken:
                    row.update(status="skipped", reason=skip[provider] or broken[provider])
                    continue
                progress.show(f"{op} {mode} {row['dtype']} d={case.d} k={case.k} M={M} {provider}")
                try:
                    if inputs is None:
                        inputs = cases.make_inputs(case, device, cases.input_copies(case, device))
                    if provider not in fns:
                        fns[provider] = cases.provider_fn(op, provider, args.activation,
                                                          compile_dynamic=not args.compile_static)
                    setup, run = cases.runner(fns[provider], mode, inputs)
                    t = timing.measure(setup, run, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
                    if provider not in saved:
                        saved[provider] = timing.saved_activation_bytes(fns[provider], inputs["xs"][0],
                                                                        *inputs["params"])
                    kept = saved[provider]
                    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                               peak_mib=timing.peak_memory_mib(setup, run, device),
                               saved_mib=kept.new / 2**20, saved_total_mib=kept.total / 2**20)
                except (NotImplementedError, ValueError) as exc:  # the backend's "cannot run this case"
                    row.update(status="skipped", reason=str(exc))
                except torch.cuda.OutOfMemoryError:
                    row.update(status="skipped", reason="out of memory")
                    inputs = None
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001  e.g. torch.compile without a C++ compiler
                    why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
                    row.update(status="error", reason=why)
                    broken[provider] = f"not run after an error on an earlier case ({why}); drop it with --providers"


def _plot_json(path: Path, parser: argparse.ArgumentParser) -> int:
    try:
        saved = json.loads(path.read_text())
        rows, device = saved["rows"], saved.get("metadata", {}).get("device", "unknown device")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--plot-json {path}: not a results JSON of this command ({type(exc).__name__}: {exc})")
    paths = report.plot(rows, path.parent, path.stem, device)
    print("wrote " + (", ".join(map(str, paths)) or "nothing"))
    return 0 if paths else 1


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = shlex.join(["compacter-bench", *argv])
    if args.plot_json:
        return _plot_json(args.plot_json, parser)
    if args.host or args.multitask:  # a process of its own: the launches are stubbed, and without a GPU
        env = dict(os.environ)  # Triton's launch path is its interpreter's, which is chosen at import
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        module = "compacter_kernels.bench." + ("host" if args.host else "multitask")
        return subprocess.call([sys.executable, "-m", module, "--out", str(args.out)], env=env)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    args.preset = args.preset or ("full" if gpu else "quick")
    args.dtype = args.dtype or [torch.bfloat16 if gpu else torch.float32]
    shapes = _shapes(args, parser)  # before any output: bad values exit here with code 2
    if args.threads or not gpu:  # one thread by default on a CPU: steadier timings
        torch.set_num_threads(args.threads or 1)
    if not gpu:  # torch.compile's C++ toolchain look-up would print this inside the progress bar
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        print("no GPU: timing the CPU reference paths only (triton and cuda are skipped), peak memory not "
              f"measured, {'preset ' + args.preset if not args.e2e else 'small e2e model'}")

    if args.e2e:
        backends = [p for p in args.providers if p in ("reference", *cases.FUSED)]
        rows, ok = e2e.run(args.model, args.layers or (12 if gpu else 2), args.batch or (32 if gpu else 2),
                           args.seq or (128 if gpu else 64), args.steps or (20 if gpu else 5), args.dtype[0],
                           backends, device, compile=args.e2e_compile)
        meta = report.metadata(device, command, model=args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"compacter-e2e-{_stamp()}.json"
        path.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
        return 0 if ok else 1

    args.m = args.m or list(PRESETS[args.preset][1])
    bw = timing.copy_bandwidth_gbps(device)
    rows, interrupted = sweep(args, shapes, device, bw)
    report.add_derived(rows)
    meta = report.metadata(device, command, copy_bandwidth_gbps=bw, preset=args.preset, activation=args.activation,
                           compile="dynamic=False per shape" if args.compile_static else "dynamic=True per sweep",
                           interrupted=interrupted)
    report.print_table(rows, meta)
    checks = report.target_checks(rows)
    print("\n" + report.targets_markdown(checks), end="")
    stem = f"compacter-bench-{_stamp()}"
    paths = report.write_files(rows, meta, args.out, stem, checks)
    if not args.no_plot:
        paths += report.plot(rows, args.out, stem, meta["device"])
    print("wrote " + ", ".join(map(str, paths)))
    if interrupted:
        return 130
    return 1 if any(r["status"] == "error" for r in rows) else 0

