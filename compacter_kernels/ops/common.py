"""What both kernel backends share: the named projection they take, the layout of the tensors
their kernels read, autocast, and the ops' differentiable math (what autograd differentiates
where a fused kernel's backward cannot serve: second derivatives, forward-mode AD, torch.func).
No backend is imported here."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import ACTIVATIONS

# Activation codes the kernels take (Triton constexpr, CUDA int): gelu 0, gelu_tanh 1, relu 2, silu 3, identity 4.
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


class Projection(NamedTuple):
    """One projection of an adapter, x (.., I) -> (.., O): rule None for a dense (I, O) matrix
    ``left``, else H = sum_i kron(rule[i], left[i] @ right[i]) (right None: left is the full
    (n, I/n, O/n)). For a mixed-task batch every tensor has the task dimension first, but a
    rule of three dimensions, which the tasks share."""
    rule: Optional[Tensor]
    left: Tensor
    right: Optional[Tensor]
    bias: Optional[Tensor]

    def packed(self, read_transposed: bool) -> "Projection":
        """The layout of every parameter the kernels take: contiguous (strided, expanded or offset
        views are copied; a contiguous tensor is passed as it is), but, where ``read_transposed``
        (the triton kernels), a dense matrix stored `transposed` (an nn.Linear weight's .t()),
        which they read as it is."""
        rule, left, right, bias = self
        keep = read_transposed and rule is None and transposed(left)
        return Projection(None if rule is None else rule.contiguous(), left if keep else left.contiguous(),
                          None if right is None else right.contiguous(), None if bias is None else bias.contiguous())


def out_features(p: Projection) -> int:
    """The output width O of a projection (a function, not a property: older torch.compile
    versions cannot trace a property of a NamedTuple)."""
    if p.rule is None:
        return p.left.shape[-1]
    return p.rule.shape[-1] * (p.left if p.right is None else p.right).shape[-1]


def rows(t: Tensor) -> Tensor:
    """2-D (M, features) view with unit feature stride (copies only when it must): the layout
    of every activation (x, residual, dy) the kernels take; any row stride, 0 included."""
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    d = t.shape[-1]
    t = t.reshape(t.numel() // d if d else math.prod(t.shape[:-1]), d)
    return t if t.stride(-1) == 1 or d <= 1 else t.contiguous()


def transposed(w: Tensor) -> bool:
    """Whether a 2-D matrix is stored transposed (w.t() contiguous, w not): an nn.Linear weight's
    .t(), which the triton kernels read as it is."""
    if w.dim() != 2:
        return False
    (rows_, cols), (s0, s1) = w.shape, w.stride()
    return s0 == 1 and s1 == rows_ and rows_ > 1 and cols > 1  # with those strides, contiguous iff a side <= 1


# ---- autocast -----------------------------------------------------------------------------------

# Device types with autocast, found once at import: torch.compile cannot trace
# torch.amp.is_autocast_available, and torch.is_autocast_enabled raises for the others (meta).
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone")
                              if torch.amp.is_autocast_available(d))


# One call that says whether autocast is on for any device (nn.RNN uses it too): the common case.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    if not _any_autocast():
        return None
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def no_autocast(t: Tensor):
    """Autocast off on t's device: the ops' own dtypes inside a forward (or a backward) that runs
    under autocast, where torch's bmm/einsum would otherwise round fp32 factors to fp16/bf16."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in _AUTOCAST_DEVICES else contextlib.nullcontext()


def autocast_inputs(x: Tensor, residual: Optional[Tensor], bias_up: Optional[Tensor]):
    """(x, residual, out dtype) as a fused adapter takes them: under autocast x in the autocast
    dtype, the residual r (x itself when none is given) kept, and y promoted as eager promotes
    r + (... + bias_up). The parameters keep their dtypes: the kernels sum H in fp32 and round
    it once to x's dtype, add the biases in fp32, and give fp32 parameter gradients."""
    amp = autocast_dtype(x)
    if amp is None:
        return x, residual, x.dtype
    r = x if residual is None else residual
    return x.to(amp), r, torch.promote_types(r.dtype, amp if bias_up is None else bias_up.dtype)


# ---- routing ------------------------------------------------------------------------------------

def needs_math(x: Tensor) -> bool:
    """Whether a call must run as differentiable torch ops rather than a fused kernel: under a
    torch.func transform (grad, vmap, jvp, ...) or forward-mode AD (a dual level entered), which
    a fused kernel cannot serve (its backward cannot be transformed, it has no tangent)."""
    if torch.compiler.is_compiling():
        return False
    return (torch.autograd.forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


def traced(x: Tensor) -> bool:
    """Whether a Function must call its custom op rather than the op's own function: while
    torch.compile traces, for fake, meta and subclass tensors, and under dispatch modes, all of
    which see the op and its fake impl. Plain tensors in eager mode call the function itself:
    the same code without the Python dispatcher's round trip, which costs more host time than
    the launches at small sizes (benchmarks/NOTES.md)."""
    return (torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.is_meta
            or torch._C._len_torch_dispatch_stack() > 0)


def wants_grad(x: Tensor, residual: Optional[Tensor], params) -> bool:
    """Whether autograd records the op: grad mode on and a tensor argument that requires grad.
    Where not (no_grad, inference_mode, frozen weights), the forward need not write z."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (x, residual, *params))


# ---- the ops' differentiable math ---------------------------------------------------------------

def h_math(p: Projection, dtype: torch.dtype) -> Tensor:
    """A projection's H (I, O), or (T, I, O) stacked, in ``dtype``: summed in the wider of fp32 and
    ``dtype`` from the factors and rounded once (the kernels' rounding)."""
    if p.rule is None:
        return p.left.to(dtype)
    ct = torch.promote_types(dtype, torch.float32)
    factors = (p.rule.to(ct), p.left.to(ct), None if p.right is None else p.right.to(ct))
    stacked = p.left.dim() == 4  # factors stacked per task
    return (reference.stacked_phm_weight(*factors) if stacked else reference.phm_weight(*factors)).to(dtype)


def _bias(b: Optional[Tensor], task_of_row: Optional[Tensor]) -> Optional[Tensor]:
    return b if b is None or task_of_row is None else b[task_of_row]


def adapter_math(x: Tensor, residual: Optional[Tensor], down: Projection, up: Projection, activation: str,
                 scale: float, out_dtype: torch.dtype, task_ids: Optional[Tensor] = None) -> Tensor:
    """y of a fused adapter (2-D x, the arguments the backends' Functions take) in differentiable
    torch ops with the kernels' dtypes (H summed in fp32 and rounded once to x's dtype, z in x's
    dtype). With ``task_ids`` (one per row) the projections are stacked per task and row i goes
    through task task_ids[i]'s adapter (`reference.task_matmul`: nothing read back to the host)."""
    with no_autocast(x):
        hd, hu = h_math(down, x.dtype), h_math(up, x.dtype)
        z = x @ hd if task_ids is None else reference.task_matmul(x, hd, task_ids)
        if down.bias is not None:
            z = z + _bias(down.bias, task_ids)
        g = reference.activation_fn(activation)(z.to(x.dtype))
        u = g @ hu if task_ids is None else reference.task_matmul(g, hu, task_ids)
        if up.bias is not None:
            u = u + _bias(up.bias, task_ids)
        y = (x if residual is None else residual) + scale * u.to(x.dtype)
        return y.to(out_dtype)


def phm_linear_math(x: Tensor, p: Projection) -> Tensor:
    """A backend's phm_linear in differentiable torch ops (see `adapter_math`)."""
    with no_autocast(x):
        y = x @ h_math(p, x.dtype)
        return y if p.bias is None else (y + p.bias).to(x.dtype)


def create_graph_grads(needs_input_grad, math_fn, tensors, grad_out: Tensor) -> tuple:
    """The input gradients of ``math_fn(*tensors)`` for ``grad_out``, as a graph autograd can
    differentiate again: a Function's backward under create_graph=True (gradient penalties,
    Hessian-vector products), which the kernels' own backward cannot give. A tensor passed
    twice (a shared rule) gets its whole gradient once."""
    firsts = {}
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and needs_input_grad[i]:
            firsts.setdefault(id(t), i)
    wanted = sorted(firsts.values())
    grads = [None] * len(needs_input_grad)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        y = math_fn(*tensors)
        found = torch.autograd.grad(y, [tensors[i] for i in wanted], grad_out, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


# ---- what the backends' adapter Functions share ------------------------------------------------
# Their inputs: (x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up,
# right_up, bias_up, task_ids, activation, scale, out_dtype, store_z, shared_rule). With
# shared_rule (one rule tensor for both projections, the paper's) rule_up is None and rule_down
# serves both: torch.compile takes no tensor passed twice to a Function.

def fake_adapter_grads(dy: Tensor, x: Tensor, params: tuple, has_residual: bool, shared_rule: bool) -> tuple:
    """What a fused adapter's backward op gives, shapes and dtypes only (its fake impl): (dx,
    d residual, each parameter's gradient), an empty tensor for each absent one, for d residual
    without a residual and for d rule_up with a shared rule."""
    grads = [x.new_empty(0) if t is None else torch.empty_like(t) for t in params]
    if shared_rule:
        grads[4] = x.new_empty(0)
    return (torch.empty_like(x), dy.new_empty(x.shape if has_residual else (0,)), *grads)


def save_adapter(ctx, inputs: tuple, saved: tuple, consts: tuple, shared_rule: bool) -> None:
    """Keeps a fused adapter's 11 tensor inputs and what its forward saved for backward (references,
    no copies), and (activation, scale, out_dtype)."""
    ctx.save_for_backward(*inputs, *saved)
    ctx.consts = consts
    ctx.shared_rule = shared_rule


def math_adapter_grads(ctx, inputs: tuple, dy: Tensor) -> tuple:
    """A fused adapter Function's gradients under create_graph=True: `adapter_math`'s, as a graph."""
    activation, scale, out_dtype = ctx.consts
    task_ids = inputs[10]

    def fn(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up):
        down = Projection(rule_down, left_down, right_down, bias_down)
        up = Projection(rule_down if ctx.shared_rule else rule_up, left_up, right_up, bias_up)
        return adapter_math(x, residual, down, up, activation, scale, out_dtype, task_ids)

    return create_graph_grads(ctx.needs_input_grad[:10], fn, inputs[:10], dy) + (None,) * 6


def adapter_grads(ctx, inputs: tuple, dx: Tensor, dres: Tensor, grads) -> tuple:
    """A fused adapter Function's gradients from its kernels' (an empty placeholder for each
    absent one): None for an absent parameter, for the second use of a shared rule and for d
    residual without a residual."""
    grads = [None if t is None else g for t, g in zip(inputs[2:10], grads)]  # rule_up None with a shared rule
    return (dx, None if inputs[1] is None else dres, *grads, None, None, None, None, None, None)


def math_phm_linear_grads(ctx, inputs: tuple, dy: Tensor) -> tuple:
    """A phm_linear Function's gradients under create_graph=True: `phm_linear_math`'s, as a graph."""
    def fn(x, rule, left, right, bias):
        return phm_linear_math(x, Projection(rule, left, right, bias))

    return create_graph_grads(ctx.needs_input_grad, fn, inputs, dy)
