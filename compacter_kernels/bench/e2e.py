"""End to end: a training step of a frozen transformer encoder with Compacter adapters.

The backbone is plain torch (``nn.TransformerEncoderLayer``, random init, dropout off), frozen.
Placement as in the Compacter paper (Houlsby's): one adapter on the attention output and one on
the feed-forward output of every layer, before each residual add and LayerNorm; every adapter
uses one shared ``PHMRule``. Trained: the adapters, the rule and a classifier head, on
synthetic token batches. The same weights and batch run with each backend, so the losses match.
Each backend runs eager and, as "<backend>+compile", with the model under
torch.compile(fullgraph=True): mode="reduce-overhead" (CUDA graphs, what takes host time out of
a step) on a GPU, the aot_eager backend elsewhere (a check that the step compiles, not a timing).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CompacterAdapter, PHMRule
from . import cases, timing

MODELS = {
    "bert-base": dict(d=768, heads=12, ff=3072, activation="gelu", norm_first=False),
    "t5-base": dict(d=768, heads=12, ff=3072, activation="relu", norm_first=True),  # pre-LN, as T5
    "t5-large": dict(d=1024, heads=16, ff=4096, activation="relu", norm_first=True),
}
VOCAB, CLASSES = 1000, 2
# Loss agreement with the reference on the first step (relative to max(1, |loss|)).
LOSS_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class AdapterEncoderLayer(nn.TransformerEncoderLayer):
    """A frozen encoder layer with adapters on the attention and feed-forward outputs."""

    def __init__(self, d, heads, ff, activation, norm_first, rule: PHMRule, backend: str):
        super().__init__(d, heads, ff, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first)
        self.requires_grad_(False)  # the backbone; the adapters below stay trainable
        self.attn_adapter = CompacterAdapter(d, rule=rule, backend=backend)
        self.ffn_adapter = CompacterAdapter(d, rule=rule, backend=backend)

    # nn.TransformerEncoderLayer computes norm(x + _sa_block(x)) and norm(x + _ff_block(x)).
    def _sa_block(self, x, *args, **kwargs):
        return self.attn_adapter(super()._sa_block(x, *args, **kwargs))

    def _ff_block(self, x):
        return self.ffn_adapter(super()._ff_block(x))


class AdapterEncoder(nn.Module):
    def __init__(self, model: str, layers: int, backend: str = "reference"):
        super().__init__()
        cfg = MODELS[model]
        self.embed = nn.Embedding(VOCAB, cfg["d"]).requires_grad_(False)
        self.phm_rule = PHMRule(4)  # registered once here, shared by every adapter
        # Larger than the paper's 1e-4 init so that the adapters move the loss and the
        # comparison between backends is not trivially satisfied.
        nn.init.normal_(self.phm_rule.phm_rule, 0.0, 0.5)
        self.layers = nn.ModuleList(AdapterEncoderLayer(**cfg, rule=self.phm_rule, backend=backend)
                                    for _ in range(layers))
        self.head = nn.Linear(cfg["d"], CLASSES)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, CompacterAdapter):
            m.backend = backend


def _compiled(model: nn.Module, device: torch.device):
    torch._dynamo.reset()  # one model object serves every backend: no guard from the last one kept
    if device.type == "cuda":
        return torch.compile(model, fullgraph=True, mode="reduce-overhead")
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def run(model_name: str, layers: int, batch: int, seq: int, steps: int, dtype: torch.dtype,
        backends: list[str], device: torch.device, compile: bool = True) -> tuple[list[dict], bool]:
    """Time ``steps`` training steps per backend, eager and (``compile``) compiled; returns
    (rows, all losses agree)."""
    torch.manual_seed(0)
    model = AdapterEncoder(model_name, layers).to(device=device, dtype=dtype)
    init = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, VOCAB, (batch, seq), device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"e2e: {model_name}, {layers} layers, batch {batch} x seq {seq}, {dtype}, "
          f"{trainable} trainable parameters (adapters + shared rule + head), {2 * layers} adapters")
    rows: list[dict] = []
    for backend, compiled in [(b, c) for b in backends for c in ((False, True) if compile else (False,))]:
        name = backend + ("+compile" if compiled else "")
        reason = cases.skip_reason(backend, device)
        if reason:
            print(f"skipped: {name}: {reason}")
            rows.append({"backend": name, "status": "skipped", "reason": reason})
            continue
        model.load_state_dict(init)
        set_backend(model, backend)
        forward = _compiled(model, device) if compiled else model
        graphs = compiled and device.type == "cuda"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses: list[torch.Tensor] = []

        def step(_state=None):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(ids).float(), labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        # warmup_ms=0, rep_ms=0: a fixed number of steps, the same for every backend.
        t = timing.measure(lambda: None, step, device, warmup_ms=0, rep_ms=0, min_reps=steps, max_reps=steps)
        mem = timing.peak_memory_mib(lambda: None, step, device)
        host = _host_ms(step, device, steps)
        rows.append({"backend": name, "status": "ok", "reason": "", "step_median_ms": t.median_ms,
                     "step_p20_ms": t.p20_ms, "step_p80_ms": t.p80_ms, "steps": t.reps, "peak_mib": mem,
                     "host_median_ms": host,
                     "first_loss": losses[0].item(), "last_loss": losses[-1].item(), "total_steps": len(losses)})
    return rows, _compare(rows, dtype)


def _host_ms(step, device: torch.device, steps: int) -> float:
    """Median host time of a step: from its start until its last launch has returned, with no
    wait for the device. Beside the step time it tells whether a step is host-bound (host time
    close to the step time) or device-bound (host time well below it). The same on a CPU."""
    times = []
    for _ in range(max(1, steps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


def _compare(rows: list[dict], dtype: torch.dtype) -> bool:
    ran = [r for r in rows if r["status"] == "ok"]
    ref: Optional[dict] = next((r for r in ran if r["backend"] == "reference"), None)
    ok = True
    for r in ran:
        mem = "not measured on CPU" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        line = (f"{r['backend']:>10}: step {r['step_median_ms']:.2f} ms (p20-p80 {r['step_p20_ms']:.2f}-"
                f"{r['step_p80_ms']:.2f}), host {r['host_median_ms']:.2f} ms of it, peak memory {mem}, "
                f"loss first step {r['first_loss']:.6f}, "
                f"after {r['total_steps']} steps {r['last_loss']:.6f}")
        if ref is not None and r is not ref:
            tol = LOSS_TOL.get(dtype, 1e-4) * max(1.0, abs(ref["first_loss"]))
            diff = abs(r["first_loss"] - ref["first_loss"])
            r["loss_matches"] = diff <= tol
            ok &= r["loss_matches"]
            line += (f"; vs reference: {ref['step_median_ms'] / r['step_median_ms']:.2f}x, first-step loss "
                     f"|diff| {diff:.2e} (tol {tol:.0e}) {'OK' if r['loss_matches'] else 'MISMATCH'}")
        print(line)
    if ref is not None and len(ran) == 1:
        print("no fused backend can run here: the reference loss has nothing to be compared with")
    return ok
