"""Results out: run metadata, derived metrics, the table, JSON / CSV files and the plot."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..backends import available_backends
from .cases import FUSED

# Metadata copied onto every CSV row, so a row read alone still says where it was measured.
ROW_METADATA = ("device", "driver_version", "torch", "triton", "cuda", "git_commit", "date")


def _run(cmd: list[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The directory holding the package (a checkout's root, for an editable install); tests move it.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent


def _checkout_head(directory: Path) -> Optional[str]:
    """HEAD of the git checkout of this project whose root is `directory`, else None."""
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=str(directory))
    if top is None or Path(top).resolve() != Path(directory).resolve():
        return None  # not a checkout, or a directory inside one (a .venv in a clone) or another repository
    if not (Path(top) / "setup.py").is_file() or not (Path(top) / "compacter_kernels" / "__init__.py").is_file():
        return None
    return _run(["git", "rev-parse", "HEAD"], cwd=top)


def git_commit() -> Optional[str]:
    """The commit of the code that runs, or None: COMPACTER_KERNELS_COMMIT (a tree copied without .git,
    e.g. to a lent GPU); else the checkout the package runs from (editable install, PYTHONPATH); else the
    commit setup.py recorded when it built this installed copy; else the checkout of this project in the
    working directory (an installed copy built without git, most likely from there)."""
    commit = os.environ.get("COMPACTER_KERNELS_COMMIT") or _checkout_head(_PACKAGE_PARENT)
    if commit:
        return commit
    try:
        from .._build_info import GIT_COMMIT as commit
    except ImportError:
        commit = None
    if commit:
        return commit
    git_top = _run(["git", "rev-parse", "--show-toplevel"], cwd=os.getcwd())
    return _checkout_head(Path(git_top)) if git_top else None


def metadata(device: torch.device, command: str, **extra: Any) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if gpu else _cpu_model(),
        "device_type": device.type,
        "driver_version": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if shutil.which("nvidia-smi") else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compacter_kernels": __version__,
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timer": "CUDA events" if gpu else "time.perf_counter",
        "cpu_threads": torch.get_num_threads(),
        "peak_memory": "torch.cuda.max_memory_allocated delta" if gpu else "not measured on CPU",
        "saved_memory": "bytes of the distinct storages autograd saves in the forward for backward "
                        "(saved_tensors_hooks); saved_mib: new tensors only, saved_total_mib: also x and "
                        "the parameters it saves",
        "backends": {name: {"available": s.available, "reason": s.reason} for name, s in available_backends().items()},
        "command": command,
        **extra,
    }


def _key(row: dict) -> tuple:
    return tuple(row[c] for c in ("op", "mode", "model", "d", "k", "n", "rank", "dtype", "M"))


def add_derived(rows: list[dict]) -> None:
    """GB/s (floor bytes / time), fraction of the floor, speed-ups over eager and compiled reference."""
    ms = {(_key(r), r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        ok = r["status"] == "ok"
        t = r["median_ms"] if ok else None
        floor_t = ms.get((_key(r), "floor"))
        ref_t = ms.get((_key(r), "reference"))
        comp_t = ms.get((_key(r), "reference+compile"))
        r["gbps"] = r["floor_bytes"] / (t * 1e-3) / 1e9 if t else None
        r["tflops"] = r["flops"] / (t * 1e-3) / 1e12 if t else None
        r["floor_fraction"] = floor_t / t if t and floor_t else None
        counted = r.get("counted_bytes")
        r["counted_vs_floor"] = counted / r["floor_bytes"] if counted and r["floor_bytes"] else None
        r["speedup_vs_reference"] = ref_t / t if t and ref_t else None
        r["speedup_vs_compile"] = comp_t / t if t and comp_t else None


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def print_table(rows: list[dict], meta: dict) -> None:
    cols = [("op", 10), ("mode", 7), ("model", 9), ("dtype", 8), ("d", 5), ("k", 4), ("M", 6),
            ("provider", 17), ("median ms", 10), ("p20-p80 ms", 17), ("GB/s", 8), ("floor", 6), ("bytes", 6),
            ("x eager", 7), ("x compile", 9), ("peak MiB", 8), ("saved MiB", 9), ("all MiB", 8)]
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s | peak memory: {meta['peak_memory']}")
    print("GB/s = floor bytes / time; floor = floor time / time; bytes = the bytes the kernels move, counted "
          "(tests/test_traffic.py), / floor bytes; x eager / x compile = speed-up over "
          "the reference / torch.compile(reference)")
    print("saved MiB = activations the forward allocates and autograd keeps for backward; all MiB = "
          "the same plus the x and parameters it saves")
    print("  ".join(name.rjust(w) for name, w in cols))
    prev = None
    for r in rows:
        if r["status"] != "ok":
            continue
        if prev is not None and _key(r) != prev:
            print()
        prev = _key(r)
        cells = [r["op"], r["mode"], r["model"] or "-", r["dtype"], r["d"], r["k"], r["M"], r["provider"],
                 _f(r["median_ms"], ".4f"), f"{_f(r['p20_ms'], '.4f')}-{_f(r['p80_ms'], '.4f')}",
                 _f(r["gbps"], ".1f"), _pct(r["floor_fraction"]), _f(r.get("counted_vs_floor"), ".2f"),
                 *(("-", "-") if r["provider"] == "floor" else  # a bound, not a provider to compare
                   (_f(r["speedup_vs_reference"], ".2f"), _f(r["speedup_vs_compile"], ".2f"))),
                 _f(r["peak_mib"], ".1f"), _f(r["saved_mib"], ".3f"), _f(r["saved_total_mib"], ".3f")]
        print("  ".join(str(c).rjust(w) for c, (_, w) in zip(cells, cols)))
    # Skipped and failed rows: one line per (provider, status, reason), not one per case.
    groups: dict[tuple, int] = defaultdict(int)
    for r in rows:
        if r["status"] != "ok":
            groups[(r["provider"], r["status"], r["reason"])] += 1
    for (provider, status, reason), count in groups.items():
        print(f"{status}: {provider} ({count} rows): {reason}")
    noisy = [r for r in rows if r["status"] == "ok" and r["provider"] != "floor" and r["p20_ms"]
             and r["p80_ms"] / r["p20_ms"] > NOISY_SPREAD]
    if noisy:
        print(f"WARNING: {len(noisy)} timings spread more than {NOISY_SPREAD}x from p20 to p80 (e.g. {noisy[0]['op']} "
              f"{noisy[0]['mode']} M={noisy[0]['M']} {noisy[0]['provider']}): the machine was busy; compare "
              "ratios from one run, or rerun with --threads 1 on a quiet machine")


# p80 / p20 past which a timing is reported as noisy.
NOISY_SPREAD = 1.5


# The kernels' performance targets (the Triton and CUDA issues), judged on bf16 rows of the
# fused adapters: (what, mode, M, the row's metric, the least value that meets it).
TARGETS = (
    ("fwd, fraction of the floor", "fwd", 32768, "floor_fraction", 0.80),
    ("bwd, fraction of the floor", "bwd", 32768, "floor_fraction", 0.70),
    ("fwd+bwd, speed-up over eager", "fwd+bwd", 32768, "speedup_vs_reference", 3.0),
    ("fwd+bwd, speed-up over torch.compile", "fwd+bwd", 32768, "speedup_vs_compile", 1.3),
    ("fwd at M=64, speed-up over eager", "fwd", 64, "speedup_vs_reference", 4.0),
)
TARGET_OPS = ("compacter", "houlsby")


def target_checks(rows: list[dict]) -> list[dict]:
    """Each target that this run's rows can speak to, per op, shape and fused provider: its
    value and whether it is met ("not measured", with the reason, when a row needed is missing
    or was not timed)."""
    by = {_key(r) + (r["provider"],): r for r in rows}
    cases = dict.fromkeys((r["op"], r["model"], r["d"], r["k"], r["n"], r["rank"]) for r in rows
                          if r["op"] in TARGET_OPS and r["dtype"] == "bfloat16" and r["provider"] in FUSED)
    checks = []
    for op, model, d, k, n, rank in cases:
        for provider in FUSED:
            for what, mode, M, metric, least in TARGETS:
                row = by.get((op, mode, model, d, k, n, rank, "bfloat16", M, provider))
                if row is None:
                    continue  # this size or mode is not in the run
                value = row.get(metric)
                if value is not None:
                    status, reason = ("met" if value >= least else "missed"), ""
                elif row["status"] != "ok":
                    status, reason = "not measured", f"{provider}: {row['reason']}"
                else:
                    status, reason = "not measured", "the row it is compared with was not timed"
                checks.append({"op": op, "model": model, "d": d, "k": k, "provider": provider, "target": what,
                               "least": least, "value": value, "status": status, "reason": reason})
    return checks


def targets_markdown(checks: list[dict]) -> str:
    """The target checks as a Markdown table (printed, and written next to the JSON)."""
    if not checks:
        return ("Targets: none judged (they are set for bf16 compacter/houlsby at M = 32768 and 64 with "
                "the triton or cuda provider; `--preset targets` runs exactly those).\n")
    lines = ["| op | d | k | provider | target | least | measured | |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        fmt = ".0%" if "fraction" in c["target"] else ".2f"
        value = "-" if c["value"] is None else format(c["value"], fmt)
        verdict = c["status"] + (f" ({c['reason']})" if c["reason"] else "")
        lines.append(f"| {c['op']} | {c['d']} | {c['k']} | {c['provider']} | {c['target']} | "
                     f"{format(c['least'], fmt)} | {value} | {verdict} |")
    met = sum(c["status"] == "met" for c in checks)
    missed = sum(c["status"] == "missed" for c in checks)
    return "\n".join(lines) + f"\n\nTargets: {met} met, {missed} missed, {len(checks) - met - missed} not measured.\n"


def write_files(rows: list[dict], meta: dict, out_dir: Path, stem: str, checks: list[dict]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"metadata": meta, "rows": rows, "targets": checks}, indent=1) + "\n")
    fields = list(rows[0]) + list(ROW_METADATA) if rows else list(ROW_METADATA)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{m: meta[m] for m in ROW_METADATA}})
    paths = [json_path, csv_path]
    if checks:
        md_path = out_dir / f"{stem}-targets.md"
        md_path.write_text(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit "
                           f"{meta['git_commit']}, {meta['date']}\n\n" + targets_markdown(checks))
        paths.append(md_path)
    return paths


def plot(rows: list[dict], out_dir: Path, stem: str, device: str) -> list[Path]:
    """Time vs M per provider (log-log), the floor dashed; one PNG per shape and dtype,
    ops as rows and modes as columns, one legend; the title names the device. Needs
    matplotlib (the [bench] extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print('plot skipped: matplotlib is not installed (pip install --no-build-isolation ".[bench]")')
        return []
    ok = [r for r in rows if r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["model"], r["d"], r["k"], r["n"], r["rank"], r["dtype"])].append(r)
    paths = []
    for (model, d, k, n, rank, dtype), grp in groups.items():
        ops = list(dict.fromkeys(r["op"] for r in grp))
        modes = list(dict.fromkeys(r["mode"] for r in grp))
        fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.5 * len(modes), 3.5 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                series: dict[str, list[dict]] = defaultdict(list)
                for r in grp:
                    if r["op"] == op and r["mode"] == mode:
                        series[r["provider"]].append(r)
                for provider, pts in series.items():
                    pts.sort(key=lambda r: r["M"])
                    style = dict(color="black", linestyle="--") if provider == "floor" else dict(marker="o")
                    ax.plot([r["M"] for r in pts], [r["median_ms"] for r in pts], label=provider, **style)
                ax.set(xscale="log", yscale="log", title=f"{op} {mode}", xlabel="rows M", ylabel="time (ms)")
                ax.grid(True, which="both", alpha=0.3)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded 2x10^1, 3x10^1...
        legend = {}  # one legend for the grid: every provider that any panel drew
        for ax in axes.flat:
            legend.update(zip(*reversed(ax.get_legend_handles_labels())))
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize="small")
        fig.suptitle(f"{model or 'custom'}: d={d} k={k} n={n} rank={rank} {dtype}\non {device}", fontsize="medium")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = out_dir / f"{stem}-{model or 'custom'}-d{d}-k{k}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
