"""Shared test helpers: random inputs of the right scale, tolerances, comparisons."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import emulation

ON_GPU = torch.cuda.is_available()
# The cuda backend's kernels run in the CPU emulator (a test run of its own: see tests/emulation.py).
CUDA_EMULATED = emulation.requested() and not ON_GPU


def why_backend_cannot_run(name: str) -> Optional[str]:
    """Why tests cannot run kernel backend ``name`` in this process, or None."""
    import compacter_kernels as ck

    status = ck.available_backends()[name]
    if not status:
        return f"backend {name!r} unavailable here: {status.reason}"
    if ON_GPU:
        return None
    if CUDA_EMULATED:
        return None if name == "cuda" else f"this run tests the emulated cuda backend; {name} runs in the main run"
    if name == "cuda":
        return f"the cuda backend needs a GPU ({emulation.ENV}=1 runs its kernels in the CPU emulator)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend needs a GPU or TRITON_INTERPRET=1"
    return None


# Per-dtype (atol, rtol), as causal-conv1d / mamba-ssm test their kernels.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (3e-4, 1e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (1e-2, 5e-2),
}


def phm_factors(n: int, in_features: int, out_features: int, rank: Optional[int], *, dtype=torch.float64,
                device="cpu", requires_grad: bool = False):
    """Random (rule, left, right) with H entries of std ~ 1/sqrt(in_features).

    rank=None gives the unfactorised form (left = B, right = None).
    """
    p, q = in_features // n, out_features // n
    rule = torch.randn(n, n, n, dtype=dtype, device=device)
    if rank is None:
        left = torch.randn(n, p, q, dtype=dtype, device=device) / math.sqrt(in_features * n)
        right = None
    else:
        left = torch.randn(n, p, rank, dtype=dtype, device=device)
        right = torch.randn(n, rank, q, dtype=dtype, device=device) / math.sqrt(in_features * n * rank)
    out = [rule, left, right]
    if requires_grad:
        for t in out:
            if t is not None:
                t.requires_grad_(True)
    return out


@dataclass
class AdapterInputs:
    """Arguments of ck.compacter_adapter, in order."""

    x: torch.Tensor
    rule_down: torch.Tensor
    left_down: torch.Tensor
    right_down: Optional[torch.Tensor]
    bias_down: Optional[torch.Tensor]
    rule_up: torch.Tensor
    left_up: torch.Tensor
    right_up: Optional[torch.Tensor]
    bias_up: Optional[torch.Tensor]

    def args(self):
        return (self.x, self.rule_down, self.left_down, self.right_down, self.bias_down,
                self.rule_up, self.left_up, self.right_up, self.bias_up)

    def tensors(self):
        """The distinct tensors (a shared rule once), the ones gradients are checked for."""
        seen, out = set(), []
        for t in self.args():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out


def compacter_inputs(lead=(3,), d=16, k=8, n=2, rank=1, *, dtype=torch.float64, device="cpu", bias=True,
                     shared_rule=True, requires_grad=True) -> AdapterInputs:
    x = torch.randn(*lead, d, dtype=dtype, device=device)
    rd, ld, rgd = phm_factors(n, d, k, rank, dtype=dtype, device=device)
    ru, lu, rgu = phm_factors(n, k, d, rank, dtype=dtype, device=device)
    if shared_rule:
        ru = rd
    bd = torch.randn(k, dtype=dtype, device=device) if bias else None
    bu = torch.randn(d, dtype=dtype, device=device) if bias else None
    inp = AdapterInputs(x, rd, ld, rgd, bd, ru, lu, rgu, bu)
    if requires_grad:
        for t in inp.tensors():
            t.requires_grad_(True)
    return inp


def dense_inputs(lead=(3,), d=16, k=8, *, dtype=torch.float64, device="cpu", bias=True, requires_grad=True):
    """(x, w_down, b_down, w_up, b_up) for ck.adapter."""
    x = torch.randn(*lead, d, dtype=dtype, device=device)
    wd = torch.randn(d, k, dtype=dtype, device=device) / math.sqrt(d)
    wu = torch.randn(k, d, dtype=dtype, device=device) / math.sqrt(k)
    bd = torch.randn(k, dtype=dtype, device=device) if bias else None
    bu = torch.randn(d, dtype=dtype, device=device) if bias else None
    out = (x, wd, bd, wu, bu)
    if requires_grad:
        for t in out:
            if t is not None:
                t.requires_grad_(True)
    return out


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    """Gradients of <out, grad_out> w.r.t. inputs (None where an input is unused)."""
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def double_leaves(tensors, memo):
    """fp64 leaf copies of the given tensors for the reference; memo keeps sharing (one copy each)."""
    for t in tensors:
        if t is not None and id(t) not in memo:
            memo[id(t)] = t.detach().double().requires_grad_(t.requires_grad)
    return [None if t is None else memo[id(t)] for t in tensors]


def assert_matches_reference(actual, expected64, expected_lowp, dtype, what):
    """fp32: per-dtype tolerances. fp16/bf16: error vs fp64 at most twice PyTorch's own error
    in that dtype (flash-attention's rule) plus the dtype's atol."""
    assert actual.dtype == dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected64).abs().max().item()
    ref_err = (expected_lowp.double() - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    assert err <= 2 * ref_err + atol * max(1.0, scale), f"{what}: error {err:.3g} vs PyTorch's {ref_err:.3g}"


def check_op(fn_kernel, fn_ref, args, dtype, what, **kw):
    """Output and every gradient of fn_kernel(args) against fn_ref in fp64 and in dtype."""
    out = fn_kernel(*args, **kw)
    memo = {}
    a64 = double_leaves(args, memo)
    out64 = fn_ref(*a64, **kw)
    out_lp = fn_ref(*args, **kw)
    assert out.shape == out64.shape, what
    assert_matches_reference(out, out64, out_lp, dtype, f"{what} output")
    leaves = list({id(t): t for t in args if t is not None and t.requires_grad}.values())
    if not leaves or out.numel() == 0:
        return
    dy = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dy)
    g64 = torch.autograd.grad(out64, double_leaves(leaves, memo), dy.double())
    g_lp = torch.autograd.grad(out_lp, leaves, dy)
    for i, (a, b, c) in enumerate(zip(g, g64, g_lp)):
        assert_matches_reference(a, b, c, dtype, f"{what} grad #{i} {tuple(a.shape)}")

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env(drop=()) -> dict:
    """os.environ for a subprocess that imports this checkout's compacter_kernels: the checkout
    first on PYTHONPATH, as an in-place build (scripts/gpu_check.sh) is not installed."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([CHECKOUT, *filter(None, [env.get("PYTHONPATH")])])
    return env


def installed(name: str) -> bool:
    """Whether package ``name`` can be imported, without importing it. Once imported it is in
    sys.modules, where find_spec fails for a lazy module without a __spec__ (adapters)."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


def kron_loop(rule, left, right):
    """H as the paper writes it: sum_i kron(A_i, S_i T_i), one torch.kron per slice."""
    B = left if right is None else left @ right
    return sum(torch.kron(rule[i], B[i]) for i in range(rule.shape[0]))
