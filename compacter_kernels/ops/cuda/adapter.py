"""Fused bottleneck adapter on the CUDA extension's kernels: Compacter (PHM weights) and Houlsby.

Import only once ``compacter_kernels._C`` has loaded: ``_extension._register()`` does, since the
registrations below need the C++ ops ``compacter_kernels::cuda_adapter_fwd`` / ``_bwd`` /
``cuda_build_h`` (csrc/ops.cpp; kernels in csrc/adapter_*.cuh).

The row kernels take DENSE ``H_down`` (d, k) and ``H_up`` (k, d) in x's dtype. Forward, two
launches: ``cuda_build_h`` builds every PHM projection's H in fp32 from its factors (any float
dtype) and rounds it once to x's dtype (a dense weight of another dtype is converted; one in x's
dtype is read as it is), and those H's are kept for backward; then, per block of rows:

    z = x @ H_down + b_down;  g = act(z);  y = r + scale * (g @ H_up + b_up)   (r = residual or x)

and z (M x k, x's dtype) is saved for backward. Backward, three launches (``cuda_adapter_bwd``),
with du = scale * dy:

    dg = du @ H_up^T;   dz = dg * act'(z);   dx = [dy +] dz @ H_down^T   (no dy term with a residual)
    dH_down = x^T @ dz,  db_down = sum_rows dz;   dH_up = g^T @ du,  db_up = sum_rows du
    dH -> (d rule, d W_left, d W_right) (H = sum_i kron(A_i, S_i T_i)), or dH itself for a dense
    projection; d residual = dy (copied by the first kernel).

Every reduction over rows is a fixed-order sum of per-split fp32 partials (no atomics): the
gradients are bit-identical from run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import ACT_CODE, Projection, adapter_grads, fake_adapter_grads, math_adapter_grads, rows, save_adapter

if not hasattr(torch.ops.compacter_kernels, "cuda_adapter_fwd"):
    raise ImportError("compacter_kernels.ops.cuda needs the CUDA extension's ops: it is imported by "
                      "compacter_kernels._extension once compacter_kernels._C has loaded (see "
                      "compacter_kernels.available_backends()['cuda'])")


def build_h(projections: list[Projection], dtype: torch.dtype) -> list:
    """Each projection's H (I, O) in ``dtype``, one launch: summed in fp32 from a PHM
    projection's factors and rounded once; a dense matrix of another dtype converted; an empty
    tensor for a dense matrix already in dtype (use it as it is). The biases are not read."""
    return torch.ops.compacter_kernels.cuda_build_h([p.rule for p in projections], [p.left for p in projections],
                                                    [p.right for p in projections], dtype)


def check_device(x: Tensor) -> None:
    # Without this, CPU tensors would fail inside cuda_build_h with the dispatcher's message
    # (meta tensors take the C++ ops' fake impls).
    if x.device.type not in ("cuda", "meta"):
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got x on {x.device}")


def _bias(b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bias as the kernels read it: contiguous, in x's dtype or float32 (kept: no rounding)."""
    if b is None:
        return None
    return (b if b.dtype in (dtype, torch.float32) else b.float()).contiguous()


# ---- fake (meta) impls of the C++ ops: shapes and dtypes only, for torch.compile / FakeTensor ----

@torch.library.register_fake("compacter_kernels::cuda_adapter_fwd")
def _cuda_adapter_fwd_fake(x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype, store_z=True):
    torch._check(x.dim() == 2 and h_down.dim() == 2, lambda: "cuda_adapter_fwd: x and h_down must be 2-D")
    M, k = x.shape[0], h_down.shape[1]
    return x.new_empty((M, x.shape[1]), dtype=out_dtype), x.new_empty((M, k) if store_z else (0,))


@torch.library.register_fake("compacter_kernels::cuda_adapter_bwd")
def _cuda_adapter_bwd_fake(dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                           right_up, bias_up, activation, scale, has_residual, shared_rule):
    torch._check(x.dim() == 2 and z.dim() == 2, lambda: "cuda_adapter_bwd: x and z must be 2-D")
    return fake_adapter_grads(dy, x, (rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up),
                              has_residual, shared_rule)


def _built_shape(rule, left, right, dtype) -> tuple:
    if rule is not None:
        return rule.shape[0] * left.shape[1], rule.shape[0] * (left if right is None else right).shape[2]
    return tuple(left.shape) if left.dtype != dtype else (0,)


@torch.library.register_fake("compacter_kernels::cuda_build_h")
def _cuda_build_h_fake(rules, lefts, rights, dtype):
    return [left.new_empty(_built_shape(r, left, t, dtype), dtype=dtype) for r, left, t in zip(rules, lefts, rights)]


@torch.library.register_fake("compacter_kernels::cuda_phm_grads")
def _cuda_phm_grads_fake(dh, rule, left, right):
    like = lambda t: dh.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return like(rule), like(left), like(right)


# ---- the op with autograd ------------------------------------------------------------------------

class CudaAdapter(torch.autograd.Function):
    """The fused adapter with autograd for 2-D x, on the C++ ops (the arguments of
    ops.triton.adapter.TritonAdapter; ``task_ids`` must be None: no grouped kernel here, a
    mixed-task batch runs as `adapter_math`). Two launches forward: ``cuda_build_h`` builds every
    PHM projection's H in fp32 from its factors and rounds it once to x's dtype (a dense weight
    of another dtype is converted; one in x's dtype is read as it is: an empty placeholder), and
    those H's are kept for backward; then ``cuda_adapter_fwd``. Three launches backward
    (``cuda_adapter_bwd``). The same route in eager mode and under torch.compile."""

    @staticmethod
    def forward(ctx, x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
                task_ids, activation, scale, out_dtype, store_z, shared_rule):
        check_device(x)
        h_down, h_up = build_h([Projection(rule_down, left_down, right_down, bias_down),
                                Projection(rule_down if shared_rule else rule_up, left_up, right_up, bias_up)], x.dtype)
        y, z = torch.ops.compacter_kernels.cuda_adapter_fwd(
            x, residual, h_down if h_down.numel() else left_down, _bias(bias_down, x.dtype),
            h_up if h_up.numel() else left_up, _bias(bias_up, x.dtype), ACT_CODE[activation], scale, out_dtype,
            store_z)
        save_adapter(ctx, (x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
                           bias_up, task_ids), (z, h_down, h_up), (activation, scale, out_dtype), shared_rule)
        return y

    @staticmethod
    def backward(ctx, dy):
        inputs, (z, h_down, h_up) = ctx.saved_tensors[:11], ctx.saved_tensors[11:]
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
            return math_adapter_grads(ctx, inputs, dy)
        x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up, _ = inputs
        activation, scale, _ = ctx.consts
        dx, dres, *grads = torch.ops.compacter_kernels.cuda_adapter_bwd(
            rows(dy), x, z, h_down if h_down.numel() else left_down, h_up if h_up.numel() else left_up, rule_down,
            left_down, right_down, bias_down, rule_down if ctx.shared_rule else rule_up, left_up, right_up, bias_up,
            ACT_CODE[activation], scale, residual is not None, ctx.shared_rule)
        return adapter_grads(ctx, inputs, dx, dres, grads)
