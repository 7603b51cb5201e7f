"""Mixed-task batches: every task in one fused launch per kernel against a per-task loop of the
fused single-task op (what a user, or AdapterHub's BatchSplit over fused adapters, runs today)
and against a per-task loop of the eager reference (the unfused computation AdapterHub's own
BatchSplit runs: each task's slice through the PHM construction, matmuls, activation and add
as separate torch ops), and, where `adapters` is installed, AdapterHub's BatchSplit itself.

Per number of tasks T, per mode (fwd: inference under no_grad; fwd+bwd: training), per provider
("fused": ck.multitask_compacter_adapter; "loop": one ck.compacter_adapter call per task on its
rows; "eager-loop": one reference call per task; "hub-batchsplit": a one-layer BERT of width d
with T AdapterHub Compacter adapters (one at the attention output, one at the feed-forward
output) under a BatchSplit of the same sequences, the library's own code; "hub-fused": the same
model after `fuse_adapters`, each BatchSplit one multitask call; the two hub rows include the
model's own layers, the same in both, and compare with each other): the Triton launches and
the aten ops that compute, per call (counted, any machine), the host time per call with every
launch stubbed (any machine: a benchmark, not a test), and on a GPU the time per call (CUDA
events, medians). Sequences (of 128 tokens on a GPU) are spread over the tasks at random.

Run as ``compacter-bench --multitask`` (a process of its own: the host-time pass stubs Triton's
launches; without a GPU the kernels run in Triton's interpreter, at small sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
import triton
import triton.runtime.interpreter as triton_interpreter

import compacter_kernels as ck

from . import counts, report, timing

TASKS = (1, 4, 16, 64)
_GETITEMS = {cls: cls.__getitem__ for cls in (triton_interpreter.InterpretedFunction,
                                             triton.runtime.jit.KernelInterface)}


def _inputs(T: int, M: int, d: int, k: int, n: int, dtype, device, seq: int):
    g = torch.Generator().manual_seed(T)

    def rand(*shape, std=0.3):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()

    rule = rand(n, n, n)
    params = (rule, rand(T, n, d // n, 1), rand(T, n, 1, k // n), rand(T, k), rule, rand(T, n, k // n, 1),
              rand(T, n, 1, d // n), rand(T, d))
    x = rand(M // seq, seq, d, std=1.0)
    ids = torch.randint(0, T, (M // seq, 1), generator=g).to(device)
    return x, ids, params


def _per_task(x, ids, params, backend):
    """One single-task call per task present, on its rows (what a loop over the tasks runs)."""
    rd, ld, rgd, bd, ru, lu, rgu, bu = params
    d = x.shape[-1]
    x2, flat = x.reshape(-1, d), ids.expand(x.shape[:-1]).reshape(-1)
    y = torch.empty_like(x2)
    for t in flat.unique().tolist():
        rows = (flat == t).nonzero().squeeze(1)
        y[rows] = ck.compacter_adapter(x2[rows], rd if rd.dim() == 3 else rd[t], ld[t], rgd[t], bd[t],
                                       ru if ru.dim() == 3 else ru[t], lu[t], rgu[t], bu[t], backend=backend)
    return y.reshape(x.shape)


def _loop(x, ids, params):
    """One fused single-task call per task present, on its rows (the per-task loop)."""
    return _per_task(x, ids, params, "triton")


def _eager_loop(x, ids, params):
    """One eager reference call per task present (the unfused per-task loop)."""
    return _per_task(x, ids, params, "reference")


def _fused(x, ids, params):
    return ck.multitask_compacter_adapter(x, ids, *params, backend="triton")


PROVIDERS = {"fused": _fused, "loop": _loop, "eager-loop": _eager_loop}
HUB_PROVIDERS = ("hub-batchsplit", "hub-fused")


def _hub_run(T: int, mode: str, ids, d: int, k: int, n: int, dtype, device, fused: bool) -> Callable[[], object]:
    """A forward (or forward+backward) of a one-layer BERT whose T AdapterHub Compacter adapters run
    under a BatchSplit of ``ids``' sequences (sorted by task: BatchSplit takes contiguous
    slices), through the library's own code or, ``fused``, after `fuse_adapters`."""
    import adapters
    from transformers import BertConfig, BertModel

    from ..integrations.adapterhub import fuse_adapters

    B, seq = ids.shape[0], 128 if device.type == "cuda" else 8
    torch.manual_seed(T)
    model = BertModel(BertConfig(hidden_size=d, num_hidden_layers=1, num_attention_heads=max(1, d // 64),
                                 intermediate_size=2 * d, vocab_size=100, max_position_embeddings=seq,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    adapters.init(model)
    names = [f"task{t}" for t in range(T)]
    for name in names:
        model.add_adapter(name, config=adapters.CompacterConfig(reduction_factor=d // k, phm_dim=n))
    model.train_adapter(names)
    sizes = torch.bincount(ids.reshape(-1).cpu(), minlength=T).tolist()
    model.active_adapters = adapters.BatchSplit(*names, batch_sizes=sizes)
    model.to(device=device, dtype=dtype).train()
    if fused:
        fuse_adapters(model, backend="triton")
    tokens = torch.randint(0, 100, (B, seq), device=device)
    leaves = [p for p in model.parameters() if p.requires_grad]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return model(input_ids=tokens).last_hidden_state
        return run
    dy = torch.randn(B, seq, d, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(model(input_ids=tokens).last_hidden_state, leaves, dy)


def _call(provider: Callable, mode: str, x, ids, params) -> Callable[[], object]:
    leaves = [x, *dict.fromkeys(params)]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return provider(x, ids, params)
    else:
        dy = torch.randn_like(x)

        def run():
            return torch.autograd.grad(provider(x, ids, params), leaves, dy)
    return run


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops that compute (`counts.computes`)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += counts.computes(func)
        return func(*args, **(kwargs or {}))


def _aten_ops(run: Callable[[], object]) -> int:
    with _AtenOps() as mode:
        run()
    return mode.ops


def _launches(run: Callable[[], object]) -> int:
    seen = Counter()

    def counted(cls):
        def getitem(self, grid):
            launch = _GETITEMS[cls](self, grid)

            def go(*args, **kwargs):
                seen["launches"] += 1
                return launch(*args, **kwargs)
            return go
        return getitem

    for cls in _GETITEMS:
        cls.__getitem__ = counted(cls)
    try:
        run()
    finally:
        for cls, fn in _GETITEMS.items():
            cls.__getitem__ = fn
    return seen["launches"]


def _host_us(run: Callable[[], object], reps: int, calls: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _has_adapters() -> bool:
    try:
        import adapters  # noqa: F401
    except ImportError:
        return False
    return True


def measure(tasks, M: int, d: int, k: int, n: int, dtype, device, reps: int, calls: int, seq: int,
            hub: bool = True) -> list[dict]:
    cases = {}
    for T in tasks:
        x, ids, params = _inputs(T, M, d, k, n, dtype, device, seq)
        for mode in ("fwd", "fwd+bwd"):
            for name, provider in PROVIDERS.items():
                cases[(T, mode, name)] = _call(provider, mode, x, ids, params)
            if hub:
                for name in HUB_PROVIDERS:
                    cases[(T, mode, name)] = _hub_run(T, mode, ids, d, k, n, dtype, device, name == "hub-fused")
    rows = []
    for (T, mode, name), run in cases.items():  # real launches: counts, and GPU time
        row = dict(tasks=T, mode=mode, provider=name, M=M, d=d, k=k, n=n, seq=seq, dtype=str(dtype).replace("torch.", ""),
                   launches=_launches(run), gpu_median_ms=None, gpu_p20_ms=None, gpu_p80_ms=None)
        if device.type == "cuda":
            t = timing.measure(lambda: None, lambda _: run(), device)
            row.update(gpu_median_ms=t.median_ms, gpu_p20_ms=t.p20_ms, gpu_p80_ms=t.p80_ms)
        rows.append(row)
    noop = lambda self, grid: (lambda *args, **kwargs: None)  # noqa: E731
    for cls in _GETITEMS:  # host time: launches stubbed from here on
        cls.__getitem__ = noop
    for row, run in zip(rows, cases.values()):
        row["aten_ops"] = _aten_ops(run)  # stubbed: the interpreter's own tensor ops left out
        for _ in range(3):
            run()
    host = {key: [] for key in cases}
    for _ in range(reps):  # interleaved: every variant sees the same machine state
        for key, run in cases.items():
            host[key] += _host_us(run, 1, calls)
    for row, key in zip(rows, cases):
        row["host_median_us"] = statistics.median(host[key])
    by = {(r["tasks"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:  # the kernels' rows against the loop; the hub's against the library's BatchSplit
        base = by[(r["tasks"], r["mode"], "hub-batchsplit" if r["provider"] in HUB_PROVIDERS else "loop")]
        r["baseline"] = base["provider"]
        r["host_x_baseline"] = r["host_median_us"] / base["host_median_us"]
        r["gpu_x_baseline"] = (r["gpu_median_ms"] / base["gpu_median_ms"]) if r["gpu_median_ms"] else None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="mixed-task batches: fused against a per-task loop (module docstring)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--tasks", default=",".join(map(str, TASKS)), help="numbers of tasks (default 1,4,16,64)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per timed host rep (default 5)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    tasks = [int(t) for t in args.tasks.split(",")]
    # Sequences of 128 tokens on a GPU; on the CPU the interpreter runs the kernels: small, 16 sequences of 8.
    M, d, k, seq = (8192, 768, 24, 128) if gpu else (128, 32, 16, 8)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_num_threads(1)
    hub = _has_adapters()
    rows = measure(tasks, M, d, k, 4, dtype, device, args.reps, args.calls, seq, hub=hub)
    print(f"mixed-task batches, M={M} d={d} k={k} n=4 {rows[0]['dtype']} on {device.type}; host time with "
          "launches stubbed" + ("" if gpu else "; no GPU: no GPU time")
          + ("" if hub else "; `adapters` not installed: no hub rows"))
    print("x base: against the loop (hub rows: against hub-batchsplit, the library's own BatchSplit)")
    print(f"{'T':>3} {'mode':>8} {'provider':>14} {'launches':>8} {'aten ops':>8} {'host us':>9} {'x base':>7} "
          f"{'GPU ms':>8} {'x base':>7}")
    for r in rows:
        gpu_ms = "-" if r["gpu_median_ms"] is None else f"{r['gpu_median_ms']:.4f}"
        gpu_x = "-" if r["gpu_x_baseline"] is None else f"{r['gpu_x_baseline']:.2f}"
        print(f"{r['tasks']:>3} {r['mode']:>8} {r['provider']:>14} {r['launches']:>8} {r['aten_ops']:>8} "
              f"{r['host_median_us']:9.1f} {r['host_x_baseline']:7.2f} {gpu_ms:>8} {gpu_x:>7}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compacter-multitask-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    meta = report.metadata(device, "compacter-bench --multitask", shape=dict(M=M, d=d, k=k, n=4))
    path.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
