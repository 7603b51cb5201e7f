"""What every kernel backend shares: the entry points with the reference's signatures, one
layout rule for the tensors the kernels take, the autograd registrations of the fused ops (one
for each op kind), their differentiable math (second derivatives, torch.func) and autocast.
No triton import: the CUDA backend uses it too; no backend imported here."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import ACTIVATIONS

# Activation codes the kernels take (Triton constexpr, CUDA int): gelu 0, gelu_tanh 1, relu 2, silu 3, identity 4.
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


def rows(t: Tensor) -> Tensor:
    """2-D (M, features) view with unit feature stride (copies only when it must): the layout
    of every activation (x, residual, dy) the kernels take; any row stride, 0 included."""
    if t.dim() == 2 and t.stride(1) == 1:  # the common case, without a reshape (host time)
        return t
    d = t.shape[-1]
    t = t.reshape(t.numel() // d if d else math.prod(t.shape[:-1]), d)
    return t if t.stride(-1) == 1 or d <= 1 else t.contiguous()


def dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """The layout of every parameter the kernels take (rules, factors, weights, biases): packed
    (strided, expanded or offset views are copied; a packed tensor is passed as it is)."""
    return None if t is None else t.contiguous()


def transposed(w: Tensor) -> bool:
    """Whether a 2-D matrix is stored transposed (w.t() contiguous, w not): an nn.Linear weight's
    .t(), which a backend that reads it as it is (``adapter_entry_points``' transposed_weights)
    takes without a copy."""
    if w.dim() != 2:
        return False
    (rows_, cols), (s0, s1) = w.shape, w.stride()
    return s0 == 1 and s1 == rows_ and rows_ > 1 and cols > 1  # with those strides, contiguous iff a side <= 1


def out_features(rule: Optional[Tensor], left: Tensor, right: Optional[Tensor]) -> int:
    """Output width of a projection given as (rule, left, right); rule None = dense (I, O) left."""
    if rule is None:
        return left.shape[1]
    return rule.shape[0] * (left if right is None else right).shape[2]


# Device types with autocast, found once at import: torch.compile (Dynamo, torch 2.11) cannot trace
# torch.amp.is_autocast_available, and torch.is_autocast_enabled raises for the others (meta).
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone")
                              if torch.amp.is_autocast_available(d))


def no_autocast(t: Tensor):
    """Autocast off on t's device: the ops' own dtypes inside a forward (or a backward) that runs
    under autocast, where torch's bmm/einsum would otherwise round fp32 factors to fp16/bf16."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in _AUTOCAST_DEVICES else contextlib.nullcontext()


def _h_math(rule: Optional[Tensor], left: Tensor, right: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if rule is None:
        return left.to(dtype)
    ct = torch.promote_types(dtype, torch.float32)
    return reference.phm_weight(rule.to(ct), left.to(ct), None if right is None else right.to(ct)).to(dtype)


def adapter_math(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
                 activation, scale, out_dtype):
    """(y, z) of a backend's fused adapter op (the arguments `adapter_entry_points` passes) in
    differentiable torch ops, with the kernels' dtypes (H summed in fp32 and rounded once to x's
    dtype, z in x's dtype). What autograd differentiates where the kernels' backward cannot
    serve: a second derivative (create_graph=True), torch.func transforms, empty widths."""
    with no_autocast(x):
        z = x @ _h_math(rule_down, left_down, right_down, x.dtype)
        if bias_down is not None:
            z = z + bias_down
        z = z.to(x.dtype)
        u = reference.activation_fn(activation)(z) @ _h_math(rule_up, left_up, right_up, x.dtype)
        if bias_up is not None:
            u = u + bias_up
        y = (x if residual is None else residual) + scale * u.to(x.dtype)
        return y.to(out_dtype), z


def phm_linear_math(x, rule, left, right, bias):
    """A backend's phm_linear op in differentiable torch ops (see `adapter_math`)."""
    with no_autocast(x):
        y = x @ _h_math(rule, left, right, x.dtype)
        return y if bias is None else (y + bias).to(x.dtype)


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def create_graph_grads(ctx, math_fn: Callable, tensors, consts, grad_out: Tensor):
    """The input gradients of ``math_fn(*tensors, *consts)`` (its first output) for ``grad_out``,
    as a graph autograd can differentiate again: the backward under create_graph=True
    (gradient penalties, Hessian-vector products), which the kernels' own backward cannot give.
    A tensor passed twice (the shared rule) gets its whole gradient once."""
    firsts = {}
    for i, t in enumerate(tensors):
        if t is not None and ctx.needs_input_grad[i]:
            firsts.setdefault(id(t), i)
    wanted = sorted(firsts.values())
    grads = [None] * len(ctx.needs_input_grad)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        out = math_fn(*tensors, *consts)
        y = out[0] if isinstance(out, tuple) else out
        found = torch.autograd.grad(y, [tensors[i] for i in wanted], grad_out, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


# One call that says whether autocast is on for any device (nn.RNN uses it too); x.device costs more.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    if not _any_autocast():  # the common case, without reading x.device (host time)
        return None
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _needs_grad(x: Tensor, residual: Optional[Tensor], params) -> bool:
    """Whether autograd records the op: grad mode on and a tensor argument that requires grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (residual is not None and residual.requires_grad):
        return True
    for t in params:
        if t is not None and t.requires_grad:
            return True
    return False


def plannable(x) -> bool:
    """Plain tensors in eager mode, no transform or dispatch mode active: where a fused op's route
    depends on its arguments' signature alone (see `adapter_entry_points`' ``plan``)."""
    return (type(x) is torch.Tensor and not x.is_meta and not torch.compiler.is_compiling()
            and not _functorch_active() and torch._C._len_torch_dispatch_stack() == 0)


def autocast_inputs(x: Tensor, residual: Optional[Tensor], bias_up: Optional[Tensor]):
    """(x, residual, out dtype) as a fused adapter takes them: under autocast x in the autocast
    dtype, the residual r (x itself when none is given) kept, and y promoted as eager promotes
    r + (... + bias_up)."""
    amp = autocast_dtype(x)
    if amp is None:
        return x, residual, x.dtype
    r = x if residual is None else residual
    return x.to(amp), r, torch.promote_types(r.dtype, amp if bias_up is None else bias_up.dtype)


def adapter_entry_points(forwards: tuple, inference: Optional[Callable] = None, transposed_weights: bool = False):
    """(compacter_adapter, adapter) with the reference's signatures, on a backend's forwards
    ``forward(x2d, residual2d, *down, bias_down, *up, bias_up, activation, scale, out_dtype)``
    and the same on nn.Linear weights (the pair `register_adapter_op` returns; down and up are
    (rule, left, right) triples, rule None meaning a dense matrix). Where no gradient is wanted
    (no_grad, inference_mode, frozen weights; plain tensors, eager) ``inference`` (same
    arguments, returns y), if given, runs instead: the forward without z. With
    ``transposed_weights`` the backend takes a dense matrix stored `transposed` as it is (an
    nn.Linear's weight.t()), otherwise it is copied; and ``adapter.linear`` is ``adapter`` on
    nn.Linear weights (out, in), the Function's inputs themselves: no transposes for autograd to
    record and run back (host time; the AdapterHub swap-in calls it). Each of the three has a
    ``plan``: its route fixed for one signature of arguments, which `functional` keeps and calls
    on a repeated call (host time).

    Under autocast they behave as the eager reference: matmuls in the autocast dtype and
    y = r + scale * (g @ H_up + b_up) promoted as eager promotes it (an fp32 b_up or r gives an
    fp32 y). Only x goes to the autocast dtype; the parameters keep theirs: the op sums H in fp32
    and rounds it once to x's dtype, adds the biases in fp32, and returns each
    parameter's gradient, computed in fp32, in that parameter's dtype.
    """

    forward, forward_linear = forwards

    def matrix(w: Tensor) -> Tensor:
        return w if transposed_weights and transposed(w) else w.contiguous()

    def empty_width(x, params, linear: bool) -> bool:
        """d = 0, or a dense bottleneck k = 0: no kernel to launch."""
        return x.shape[-1] == 0 or (params[1].shape[0] if linear else out_features(*params[:3])) == 0

    def run(x, residual, params, activation, scale, linear: bool = False, planned: bool = False):
        """``params``: (rule, left, right, bias) down then up, in the layout the backend takes;
        ``linear``: dense, the nn.Linear weights (out, in) of which the backend takes the
        transposes; ``planned``: a call of a `plan` (plain tensors, eager, a width > 0), which
        goes straight to the eager Function."""
        shape = x.shape
        x, residual, out_dtype = autocast_inputs(x, residual, params[7])
        args = (rows(x), None if residual is None else rows(residual), *params, activation, scale, out_dtype)
        if not planned and empty_width(x, params, linear):
            y = adapter_math(*(linear_inputs(args) if linear else args))[0]
        elif inference is not None and not _needs_grad(x, residual, params) and (planned or plannable(x)):
            y = inference(*(linear_inputs(args) if linear else args))
        else:
            route = forward_linear if linear else forward
            y = route.eager(*args) if planned else route(*args)
        return y if y.shape == shape else y.reshape(shape)

    def compacter_adapter(x, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
                          *, activation="gelu", scale=1.0, residual=None):
        return run(x, residual, tuple(map(dense, (rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                                  right_up, bias_up))), activation, float(scale))

    def adapter(x, w_down, b_down, w_up, b_up, *, activation="gelu", scale=1.0, residual=None):
        return run(x, residual, (None, matrix(w_down), None, dense(b_down), None, matrix(w_up), None, dense(b_up)),
                   activation, float(scale))

    def adapter_linear(x, weight_down, b_down, weight_up, b_up, *, activation="gelu", scale=1.0, residual=None):
        return run(x, residual, tuple(map(dense, (None, weight_down, None, b_down, None, weight_up, None, b_up))),
                   activation, float(scale), linear=True)

    def planner(lefts: Callable, linear: bool = False) -> Callable:
        def plan(x, residual, params, activation) -> Optional[Callable]:
            """`run`'s route for arguments of this signature (each tensor's shape, strides, dtype
            and device; autocast; the activation), fixed once for plain tensors in eager mode
            (`plannable`): ``call(x, residual, params, scale)`` (a float scale), or None where
            run takes another way (a parameter it would copy, an empty width). ``params``:
            (rule, left, right, bias) down then up, as the entry point takes them (rule None:
            dense)."""
            laid = tuple(lefts(t) if i in (1, 5) else dense(t) for i, t in enumerate(params))
            if any(a is not b for a, b in zip(laid, params)):
                return None
            if empty_width(x, params, linear):
                return None
            return lambda x, residual, params, scale: run(x, residual, params, activation, scale, linear, True)
        return plan

    compacter_adapter.plan = planner(dense)
    adapter.plan = planner(matrix)
    if transposed_weights:  # a backend that reads the weights' transposes as they are
        adapter.linear = adapter_linear
        adapter_linear.plan = planner(dense, linear=True)
    return compacter_adapter, adapter


def linear_inputs(args: tuple) -> tuple:
    """A fused adapter's arguments with its dense weights (left_down, left_up) given as nn.Linear
    weights (out, in): the same with their (in, out) transposes, views read as they are."""
    args = list(args)
    args[3], args[7] = args[3].t(), args[7].t()
    return tuple(args)


def _eager_function(forward: Callable, backward: Callable) -> Callable:
    """``apply`` of an autograd.Function with this ``forward(ctx, *args)`` (the context set
    inside: with a separate setup_context, Function.apply binds the arguments with
    inspect.signature on every call, ~85 us here) and ``backward``."""

    class Eager(torch.autograd.Function):
        pass

    Eager.forward, Eager.backward = staticmethod(forward), staticmethod(backward)
    return Eager.apply


def _eager_or_op(op: Callable, eager: Callable, math_fn: Callable) -> Callable:
    """What the entry points call for a custom op with autograd (each of the three gives the op's
    first output). Plain tensors in eager mode go through ``eager``, an autograd.Function on the
    op's own Python function: the same forward and backward without torch.library's Python
    dispatch, which costs more host time than the kernels take at small sizes
    (benchmarks/NOTES.md). Everything else goes through ``op``, with its fake impl:
    torch.compile (the op is opaque to the compiler), meta tensors, tensor subclasses such as
    FakeTensor, and active dispatch modes (FakeTensorMode, FlopCounterMode, ...). Under
    torch.func transforms (grad, vmap, jacrev, ...) ``math_fn`` runs instead: the same function
    in torch ops, which functorch can transform (the kernels cannot be)."""

    def call(x, *args):
        if torch.compiler.is_compiling():
            return op(x, *args)
        if _functorch_active():
            return math_fn(x, *args)
        if type(x) is not torch.Tensor or x.is_meta or torch._C._len_torch_dispatch_stack() > 0:
            return op(x, *args)
        return eager(x, *args)

    call.eager = eager  # for a planned call (`adapter_entry_points`' plan), which has done the checks above
    return call


def op_tensors(outs, like: Tensor) -> tuple:
    """A custom op's outputs: tensors that do not alias, so an empty one for each None."""
    return tuple(like.new_empty(0) if t is None else t for t in outs)


def adapter_forward_op(name: str, forward: Callable):
    """(the custom op ``name``, its Python function) of a backend's fused adapter forward
    ``forward(x2d, residual2d, *down, bias_down, *up, bias_up, activation, scale, out_dtype)`` ->
    (y, z, H_down, H_up), where the op gives an empty tensor for each None."""

    def impl(
        x: Tensor, residual: Optional[Tensor],
        rule_down: Optional[Tensor], left_down: Tensor, right_down: Optional[Tensor], bias_down: Optional[Tensor],
        rule_up: Optional[Tensor], left_up: Tensor, right_up: Optional[Tensor], bias_up: Optional[Tensor],
        activation: str, scale: float, out_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return op_tensors(forward(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up,
                                  bias_up, activation, scale, out_dtype), x)

    return torch.library.custom_op(name, impl, mutates_args=()), impl


def register_adapter_op(fwd_op, fwd_impl: Callable, kernels_bwd: Callable, kernels_bwd_impl: Optional[Callable],
                        h_shapes: Callable):
    """Fake impl and autograd of a backend's fused adapter op ``fwd_op`` (the custom op of the
    Python function ``fwd_impl``, taking what `adapter_entry_points` passes) over the factors;
    returns the forwards to call (`_eager_or_op`), which give y: (forward, the same with the dense
    weights (left_down, left_up) given as nn.Linear weights (out, in), `linear_inputs`). The op
    gives (y, z, H_down, H_up), z and the H's it built kept for backward (empty tensors where
    there are none; ``fwd_impl``, which the eager path calls without the op, may give None
    instead), their shapes ``h_shapes(D, K, down, up, x.dtype)`` for the fake impl.

    ``kernels_bwd(dy, x, z, H_down, H_up, *down, bias_down, *up, bias_up, activation, scale, has_residual, shared_rule)``
    gives (dx, d residual, then each parameter's gradient in its dtype in the order of the
    arguments), where an absent parameter's gradient may be any placeholder, d residual a tensor
    of its own (autograd may keep it as residual.grad), and with shared_rule (one rule tensor for
    both projections) d rule_down is the rule's whole gradient. ``kernels_bwd_impl`` is the same
    without the op dispatch, for the eager path: None for every absent gradient (d residual
    without a residual, d rule_up with shared_rule), and the H's None where ``fwd_impl`` gave
    None; or None: the eager path calls ``kernels_bwd`` too. Under create_graph=True the
    backward is `adapter_math`'s, so that it can be differentiated again. No gradient is made
    for z (not differentiable; not an output of the eager path at all)."""

    def save(ctx, inputs, z, hd, hu):
        x, residual, rd, ld, rgd, bd, ru, lu, rgu, bu, activation, scale, out_dtype = inputs
        # Residual and biases are kept for the dtypes and a second derivative (references, no copies).
        ctx.save_for_backward(x, z, hd, hu, rd, ld, rgd, bd, ru, lu, rgu, bu, residual)
        ctx.has_residual = residual is not None
        ctx.shared_rule = rd is not None and rd is ru
        ctx.consts = (activation, scale, out_dtype)

    def setup_context(ctx, inputs, output):
        save(ctx, inputs, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zeros for z's gradient

    def eager_forward(ctx, *inputs):  # y its only output: z and the H's are kept, not returned
        y, z, hd, hu = fwd_impl(*inputs)
        save(ctx, inputs, z, hd, hu)
        return y

    def eager_linear_forward(ctx, *inputs):  # nn.Linear weights, transposed here (not recorded)
        y, z, hd, hu = fwd_impl(*linear_inputs(inputs))
        save(ctx, inputs, z, hd, hu)
        return y

    @fwd_op.register_fake
    def _(x, residual, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
          activation, scale, out_dtype):
        K = out_features(rule_down, left_down, right_down)
        hd, hu = h_shapes(x.shape[1], K, (rule_down, left_down, right_down), (rule_up, left_up, right_up), x.dtype)
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((x.shape[0], K)), x.new_empty(hd), x.new_empty(hu)

    def linear_math(*args):
        return adapter_math(*linear_inputs(args))

    def backward_with(kernels, from_op: bool, linear: bool = False):
        def backward(ctx, dy, *_not_differentiable):
            x, z, hd, hu, *params, residual = ctx.saved_tensors
            if dy is None:  # y not used: nothing flows back
                return (None,) * 13
            if torch.is_grad_enabled():  # create_graph=True
                rd, ld, rgd, bd, ru, lu, rgu, bu = params
                return create_graph_grads(ctx, linear_math if linear else adapter_math,
                                          (x, residual, rd, ld, rgd, bd, ru, lu, rgu, bu), ctx.consts, dy) + (None,) * 3
            if linear:  # nn.Linear weights: the kernels take their transposes, and give their gradients'
                params[1], params[5] = params[1].t(), params[5].t()
            activation, scale, _ = ctx.consts
            dx, dres, *grads = kernels(dy, x, z, hd, hu, *params, activation, scale, ctx.has_residual,
                                       ctx.shared_rule)
            if from_op:  # the op gives an empty tensor for each absent gradient (None from the impl)
                grads = [None if t is None else g for t, g in zip(params, grads)]
                if ctx.shared_rule:
                    grads[4] = None  # the whole gradient went to rule_down
                dres = dres if ctx.has_residual else None
            if linear:
                grads[1], grads[5] = grads[1].t(), grads[5].t()
            return (dx, dres, *grads, None, None, None)
        return backward

    backward = backward_with(kernels_bwd, from_op=True)
    fwd_op.register_autograd(backward, setup_context=setup_context)
    eager_kernels, from_op = (kernels_bwd, True) if kernels_bwd_impl is None else (kernels_bwd_impl, False)
    forward = _eager_or_op(lambda *args: fwd_op(*args)[0],
                           _eager_function(eager_forward, backward_with(eager_kernels, from_op)),
                           lambda *args: adapter_math(*args)[0])
    forward_linear = _eager_or_op(
        lambda *args: fwd_op(*linear_inputs(args))[0],
        _eager_function(eager_linear_forward, backward_with(eager_kernels, from_op, linear=True)),
        lambda *args: linear_math(*args)[0])
    return forward, forward_linear


def register_phm_linear_op(fwd_op, fwd_impl: Callable, kernels_bwd: Callable, kernels_bwd_impl: Callable):
    """Fake impl and autograd of a backend's ``fwd_op(x2d, rule, left, right, bias)`` (the custom
    op of ``fwd_impl``); returns the forward to call (`_eager_or_op`). ``kernels_bwd(dy, x, rule,
    left, right, bias)`` gives (dx, d rule, d left, d right, d bias), each in its parameter's dtype
    (any placeholder for an absent one); ``kernels_bwd_impl`` is the same without the op dispatch.
    Under create_graph=True: `phm_linear_math`'s backward."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def eager_forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return fwd_impl(*inputs)

    @fwd_op.register_fake
    def _(x, rule, left, right, bias):
        return x.new_empty((x.shape[0], out_features(rule, left, right)))

    def backward_with(kernels):
        def backward(ctx, dy):
            tensors = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True
                return create_graph_grads(ctx, phm_linear_math, tensors, (), dy)
            grads = kernels(dy, *tensors)
            return tuple(None if t is None else g for t, g in zip(tensors, grads))
        return backward

    fwd_op.register_autograd(backward_with(kernels_bwd), setup_context=setup_context)
    return _eager_or_op(fwd_op, _eager_function(eager_forward, backward_with(kernels_bwd_impl)), phm_linear_math)


def phm_linear_entry_point(forward: Callable) -> Callable:
    """``phm_linear`` with the reference's signature on a backend's ``forward(x2d, rule, left,
    right, bias)`` (what `register_phm_linear_op` returns). Under autocast, as eager: the
    matmul in the autocast dtype, the bias added after, promoting (an fp32 bias gives an fp32
    y). Only x is cast: H is summed in fp32 from the factors as they are and rounded once, and
    the factor gradients are computed in fp32."""

    def run(x, rule, left, right, bias):
        args = (rows(x), dense(rule), dense(left), dense(right), dense(bias))
        y = (phm_linear_math if x.shape[-1] == 0 else forward)(*args)  # in_features 0: nothing to launch
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def phm_linear(x, rule, left, right=None, bias=None):
        amp = autocast_dtype(x)
        if amp is not None:
            y = run(x.to(amp), rule, left, right, None)
            return y if bias is None else y + bias
        return run(x, rule, left, right, bias)

    return phm_linear




def task_slice(rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up, task: int = 0):
    """One task's (rule_down, left_down, ..., bias_up) of a multitask adapter's stacked
    parameters (a rule the tasks share, of 3 dimensions, as it is)."""
    def of(t):
        return None if t is None else t[task]

    def rule(r):
        return r if r.dim() == 3 else r[task]
    return (rule(rule_down), left_down[task], of(right_down), of(bias_down), rule(rule_up), left_up[task],
            of(right_up), of(bias_up))


def multitask_entry_points(compacter_adapter: Callable, adapter: Callable, grouped: Optional[Callable] = None):
    """(multitask_compacter_adapter, multitask_adapter) of a backend, with the reference's
    signatures plus ``task_ids``. With a ``grouped`` implementation, every task in one launch
    per kernel: ``grouped(x2d, residual2d, ids, T, down, bias_down, up, bias_up, activation,
    scale, out_dtype, train)`` (the rows grouped by task; with autograd where ``train``, else no
    z written: no_grad, inference_mode, frozen weights). Without one, and for what it cannot
    take (torch.compile, torch.func, tensor subclasses, an empty width): one call of the
    backend's single-task op per task present (`reference.per_task`)."""

    def fused(x, task_ids, residual, down, bias_down, up, bias_up, activation, scale, T, train):
        shape = x.shape
        ids = task_ids.expand(shape[:-1]).reshape(-1)
        x, residual, out_dtype = autocast_inputs(x, residual, bias_up)
        y = grouped(rows(x), None if residual is None else rows(residual), ids, T, tuple(map(dense, down)),
                    dense(bias_down), tuple(map(dense, up)), dense(bias_up), activation, float(scale), out_dtype,
                    train)
        return y.reshape(shape)

    def usable(x) -> bool:
        return (grouped is not None and not torch.compiler.is_compiling() and not _functorch_active()
                and type(x) is torch.Tensor and not x.is_meta and x.shape[-1] > 0)

    def multitask_compacter_adapter(x, task_ids, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                    right_up, bias_up, *, activation="gelu", scale=1.0, residual=None):
        if left_down.shape[0] == 1:  # one task: the single-task op, no grouping
            return compacter_adapter(x, *task_slice(rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                                    right_up, bias_up), activation=activation, scale=scale,
                                     residual=residual)
        if usable(x):
            return fused(x, task_ids, residual, (rule_down, left_down, right_down), bias_down,
                         (rule_up, left_up, right_up), bias_up, activation, scale, left_down.shape[0],
                         _needs_grad(x, residual, (rule_down, left_down, right_down, bias_down, rule_up, left_up,
                                                   right_up, bias_up)))
        return reference.multitask_compacter_adapter(
            x, task_ids, rule_down, left_down, right_down, bias_down, rule_up, left_up, right_up, bias_up,
            activation=activation, scale=scale, residual=residual, single=compacter_adapter)

    def multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, *, activation="gelu", scale=1.0, residual=None):
        if w_down.shape[0] == 1:  # one task: the single-task op, no grouping
            return adapter(x, w_down[0], None if b_down is None else b_down[0], w_up[0],
                           None if b_up is None else b_up[0], activation=activation, scale=scale, residual=residual)
        if usable(x) and w_down.shape[-1] > 0:  # a bottleneck of width 0: the loop (adapter_math)
            return fused(x, task_ids, residual, (None, w_down, None), b_down, (None, w_up, None), b_up, activation,
                         scale, w_down.shape[0], _needs_grad(x, residual, (w_down, b_down, w_up, b_up)))
        return reference.multitask_adapter(x, task_ids, w_down, b_down, w_up, b_up, activation=activation,
                                           scale=scale, residual=residual, single=adapter)

    return multitask_compacter_adapter, multitask_adapter
