"""Host time per call: what the Python and dispatch around the kernels cost, on any machine.

Every Triton launch is replaced by a no-op, so only host work is timed (outputs are left
unwritten: a benchmark, not a test). Tiny shapes (M = 4, d = 16, k = 4, n = 4) keep the eager
reference's own kernels negligible, so its time is dispatch too. Per op, forward and
forward+backward, side by side in one interleaved run: ours (the triton backend), the eager
reference, where `adapters` is installed an AdapterHub adapter module run by the library
("hub") and after `fuse_adapters` ("hub-fused": its "x ours" is what the swap-in adds to a
direct call), and two bare ``torch.autograd.Function``s with the op's inputs and output that do
nothing: "bare" returns only dx, "bare-grads" a gradient for every input (what the fused op
returns: the least an op of its signature can cost). Ratios to the bare Function and to the reference
are the figures to compare across machines; absolute times depend on the CPU.

Run as ``compacter-bench --host`` (which starts this module with TRITON_INTERPRET=1 where no
GPU is visible, as the kernels' launch path is then the interpreter's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.runtime.interpreter as triton_interpreter

import compacter_kernels as ck

from . import report

M, D, K, N = 4, 16, 4, 4


def _stub_launches() -> None:
    noop = lambda self, grid: (lambda *args, **kwargs: None)  # noqa: E731
    triton_interpreter.InterpretedFunction.__getitem__ = noop
    triton.runtime.jit.KernelInterface.__getitem__ = noop


def _bare(n_inputs: int, out_features: int, every_gradient: bool = False):
    """A Function of the op's inputs that makes its output (one allocation, one stubbed launch)
    and in backward dx only ("bare", the issue's yardstick) or, ``every_gradient``, a gradient
    for every input as the fused op must ("bare-grads": the least an op of this signature costs)."""
    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *params):
            ctx.save_for_backward(x, *params) if every_gradient else ctx.save_for_backward(x)
            return x.new_empty((x.shape[0], out_features))

        @staticmethod
        def backward(ctx, dy):
            saved = ctx.saved_tensors
            if every_gradient:
                return tuple(torch.empty_like(t) for t in saved)
            return (torch.empty_like(saved[0]),) + (None,) * (n_inputs - 1)

    return Bare.apply


def cases(device: torch.device) -> dict[str, dict[str, tuple[Callable, list, torch.Tensor]]]:
    """op -> provider -> (forward, leaves, dy)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    x, rule = t(M, D), t(N, N, N)
    ld, rgd, bd, lu, rgu, bu = t(N, D // N, 1), t(N, 1, K // N), t(K), t(N, K // N, 1), t(N, 1, D // N), t(D)
    wd, wu = t(D, K), t(K, D)
    comp = (x, rule, ld, rgd, bd, rule, lu, rgu, bu)
    dense = (x, wd, bd, wu, bu)
    phm = (x, rule, ld, rgd, bd)
    out = {}
    for op, args, fn in (("compacter", comp, ck.compacter_adapter), ("houlsby", dense, ck.adapter),
                         ("phm_linear", phm, ck.phm_linear)):
        leaves = list({id(a): a for a in args}.values())
        dy = torch.randn(M, K if op == "phm_linear" else D, device=device)
        bare, full = _bare(len(args), dy.shape[1]), _bare(len(args), dy.shape[1], every_gradient=True)
        out[op] = {
            "ours": (lambda fn=fn, args=args: fn(*args, backend="triton"), leaves, dy),
            "reference": (lambda fn=fn, args=args: fn(*args, backend="reference"), leaves, dy),
            "bare": (lambda bare=bare, args=args: bare(*args), leaves[:1], dy),
            "bare-grads": (lambda full=full, args=args: full(*args), leaves, dy),
        }
    return out


def hub_cases(device: torch.device) -> dict[str, dict[str, tuple[Callable, list, torch.Tensor]]]:
    """op -> {"hub": an AdapterHub adapter module (CompacterConfig / SeqBnConfig at the shapes
    above, gelu) run by the library's Adapter.forward, "hub-fused": its forward after
    `fuse_adapters`}, both called without nn.Module's __call__, inside the model's ForwardContext
    (where the shared rule is found), which stays entered; {} without `adapters`."""
    try:
        import adapters
        from adapters.context import ForwardContext
        from adapters.methods.modeling import Adapter
        from transformers import BertConfig, BertModel
    except ImportError:
        return {}
    from ..integrations.adapterhub import _bottleneck_adapters, fuse_adapters

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=1, intermediate_size=D,
                                 vocab_size=10, max_position_embeddings=M))
    adapters.init(model)
    configs = {"compacter": adapters.CompacterConfig(reduction_factor=D // K, phm_dim=N),
               "houlsby": adapters.SeqBnConfig(reduction_factor=D // K, non_linearity="gelu")}
    for name, config in configs.items():
        model.add_adapter(name, config=config)
    model.train_adapter(list(configs))
    model.to(device)
    fuse_adapters(model, backend="triton")
    ForwardContext(model, input_ids=torch.zeros(1, M, dtype=torch.long, device=device)).__enter__()  # stays entered
    x = torch.randn(M, D, device=device, requires_grad=True)
    leaves = [x, *(p for p in model.parameters() if p.requires_grad)]
    dy = torch.randn(M, D, device=device)
    out = {}
    for op in configs:
        module = next(adapter for _, name, adapter, _ in _bottleneck_adapters(model) if name == op)
        out[op] = {"hub": (lambda module=module: Adapter.forward(module, x, x)[0], leaves, dy),
                   "hub-fused": (lambda module=module: module.forward(x, x)[0], leaves, dy)}
    return out


def measure(reps: int = 15, calls: int = 200) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _stub_launches()
    table = cases(device)
    for op, providers in hub_cases(device).items():
        table[op].update(providers)
    runs: dict[tuple, Callable] = {}
    for op, providers in table.items():
        for provider, (fwd, leaves, dy) in providers.items():
            runs[(op, provider, "fwd")] = fwd
            runs[(op, provider, "fwd+bwd")] = (lambda fwd=fwd, leaves=leaves, dy=dy:
                                               torch.autograd.grad(fwd(), leaves, dy, allow_unused=True))
    for run in runs.values():  # warm up: caches, first-call imports
        for _ in range(20):
            run()
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for _ in range(reps):  # interleaved: every variant sees the same machine state
        for key, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[key].append((time.perf_counter() - t0) / calls * 1e6)
    rows = []
    for (op, provider, mode), ts in times.items():
        med = statistics.median(ts)
        rows.append({"op": op, "provider": provider, "mode": mode, "median_us": med,
                     "p20_us": statistics.quantiles(ts, n=5)[0], "p80_us": statistics.quantiles(ts, n=5)[3]})
    by = {(r["op"], r["provider"], r["mode"]): r["median_us"] for r in rows}
    for r in rows:
        r["x_bare"] = r["median_us"] / by[(r["op"], "bare", r["mode"])]
        r["x_bare_grads"] = r["median_us"] / by[(r["op"], "bare-grads", r["mode"])]
        r["x_reference"] = r["median_us"] / by[(r["op"], "reference", r["mode"])]
        r["x_ours"] = r["median_us"] / by[(r["op"], "ours", r["mode"])]  # hub-fused: fuse_adapters' cost
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="host time per call, launches stubbed (see the module docstring)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--calls", type=int, default=200, help="calls per timed rep (default 200)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.reps, args.calls)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"host time per call, Triton launches stubbed, M={M} d={D} k={K} n={N} on {device.type}")
    print(f"{'op':>10} {'mode':>8} {'provider':>10} {'median us':>10} {'p20-p80 us':>15} {'x bare':>7} "
          f"{'x bare-grads':>12} {'x eager':>8} {'x ours':>7}")
    for r in rows:
        print(f"{r['op']:>10} {r['mode']:>8} {r['provider']:>10} {r['median_us']:10.1f} "
              f"{r['p20_us']:7.1f}-{r['p80_us']:<7.1f} {r['x_bare']:7.2f} {r['x_bare_grads']:12.2f} "
              f"{r['x_reference']:8.2f} {r['x_ours']:7.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compacter-host-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    meta = report.metadata(device, "compacter-bench --host", shape=dict(M=M, d=D, k=K, n=N))
    path.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
