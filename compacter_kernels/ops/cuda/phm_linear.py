"""PHM linear on the CUDA backend: H built by the extension's ``cuda_build_h``, the matmuls on cuBLAS.

Forward, for x (M, I), two launches:

    H = sum_i kron(A_i, S_i T_i)   (I, O), by `cuda_build_h` in fp32 from the factors, rounded once to x's dtype
    y = x @ H + b                  (torch.addmm on cuBLAS, fp32 accumulation)

No GEMM of our own: H is small (I x O elements, one launch) and the cost is the M x I x O product,
where a hand-written kernel would be slower than cuBLAS at these sizes. Unlike the adapter there
is no bottleneck between two products to keep on chip; fusing the Kronecker build into the GEMM
(as the Triton backend can) would save only the I x O round trip of H. Backward, with H rebuilt
rather than saved (one small launch), five launches with the bias:

    dx = dy @ H^T                                (cuBLAS, x's dtype)
    dH = x^T @ dy,  db = sum_rows dy             (fp32 results: fp16/bf16 products are not rounded)
    dH -> (d rule, d W_left, d W_right) by `cuda_phm_grads` (one launch)

Under autocast only x is cast (see `phm_linear`): H is still summed in fp32 from the factors as
they are and rounded once to the autocast dtype, and every parameter gradient is computed in fp32
and returned in its parameter's dtype.

Import only once ``compacter_kernels._C`` has loaded (``_extension._register()`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import Projection, math_phm_linear_grads, no_autocast
from . import adapter as cuda_adapter


_MM_OUT_DTYPE = torch.__version__ >= (2, 8)  # torch.mm(..., out_dtype=) came with torch 2.8


def _mm_wide(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 (fp64 for fp64 inputs); fp16/bf16 products are not rounded on the way out."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and _MM_OUT_DTYPE:  # cuBLAS writes its fp32 accumulator as it is (CUDA only)
            return torch.mm(a, b, out_dtype=torch.float32)
        a, b = a.float(), b.float()  # elsewhere (meta, the CPU tests, older torch): the same values via an upcast
    return a @ b


def phm_linear_backward(dy: Tensor, x: Tensor, H: Tensor, has_bias: bool):
    """(dx in x's dtype, dH (I, O), db (O,) or None) of y = x @ H + b for 2-D x, dy in x's dtype
    and H (I, O); dH and db in fp32 (fp64 for fp64). Plain torch on any device: the tests check
    it on CPU against autograd of the reference."""
    dx = dy @ H.t()
    dH = _mm_wide(x.t(), dy)
    db = dy.sum(0, dtype=dH.dtype) if has_bias else None
    return dx, dH, db


class CudaPHMLinear(torch.autograd.Function):
    """y (M, O) = x (M, I) @ H + bias for 2-D x with autograd: ``cuda_build_h`` builds H in fp32
    from the factors (any float dtype) and rounds it once to x's dtype; the products run on
    cuBLAS. The same route in eager mode and under torch.compile (C++ ops and torch ops)."""

    @staticmethod
    def forward(ctx, x, rule, left, right, bias):
        cuda_adapter.check_device(x)  # the backend's one device check (the CPU emulation of the tests lifts it)
        ctx.save_for_backward(x, rule, left, right, bias)
        (H,) = cuda_adapter.build_h([Projection(rule, left, right, bias)], x.dtype)
        return torch.mm(x, H) if bias is None else torch.addmm(bias, x, H)

    @staticmethod
    def backward(ctx, dy):
        x, rule, left, right, bias = inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return math_phm_linear_grads(ctx, inputs, dy)
        # H is rebuilt rather than saved. The op's own dtypes even when .backward() runs inside an
        # autocast region (it would round the fp32 products to the autocast dtype).
        with no_autocast(dy):
            (H,) = cuda_adapter.build_h([Projection(rule, left, right, bias)], x.dtype)
            dx, dH, db = phm_linear_backward(dy, x, H, bias is not None)
            g_rule, g_left, g_right = torch.ops.compacter_kernels.cuda_phm_grads(dH, rule, left, right)
        return dx, g_rule, g_left, None if right is None else g_right, None if bias is None else db.to(bias.dtype)
