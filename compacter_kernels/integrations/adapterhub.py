"""Run AdapterHub (`adapters`) bottleneck adapters through the fused op, in place.

    import adapters
    adapters.init(model)
    model.add_adapter("task", config=adapters.CompacterConfig())
    model.train_adapter("task")
    fuse_adapters(model)          # Compacter / Houlsby / Pfeiffer adapters now run one fused op,
                                  # a BatchSplit / MultiTask of them one multitask op

Only each adapter module's ``forward`` is overridden (an instance attribute), and the override
computes with the library's OWN parameters (PHM factors, the shared ``phm_rule`` looked up in the
ForwardContext as ``PHMLayer`` does, ``nn.Linear`` weights). Parameter names, state_dicts,
``train_adapter``, ``save_adapter`` / ``load_adapter`` and optimisers therefore see the same
model. ``unfuse_adapters`` deletes the override.

What the fused op computes is ``residual + scaling * up(act(down(x)))``; an adapter using anything
else (a layer norm inside it, gating, stochastic depth, learned scaling, another activation, the
parallel form) keeps the library's path, reported in one log line per adapter and reason. So does
a forward asked for gating scores (``output_adapter_gating_scores=True``): for an adapter without a
gate the library stores its scaled ``up`` projection as the score, which the fused op never forms.
"""

from __future__ import annotations

import logging
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
from adapters.composition import AdapterCompositionBlock, BatchSplit, Fuse
from adapters.context import AdapterSetup, ForwardContext
from adapters.methods.bottleneck import BottleneckLayer
from adapters.methods.modeling import Adapter, PHMLayer
from torch import Tensor, nn
from transformers import activations as hf_act

from .. import functional as F
from ..backends import BACKENDS, available_backends

logger = logging.getLogger("compacter_kernels")

# The library builds its activation with transformers' ACT2FN[non_linearity]; map the module type
# it gets to our name. Config names: "gelu"/"gelu_python" -> GELUActivation (erf), "gelu_new" ->
# NewGELUActivation and "gelu_pytorch_tanh" -> GELUTanh (tanh form), "relu", "swish" -> nn.SiLU,
# "silu" -> SiLUActivation, "linear" -> LinearActivation, None -> nn.Identity. Any other
# ("leakyrelu", "tanh", "gelu_fast", ...) falls back. Classes missing in a transformers version are skipped.
_ACTIVATIONS = {
    cls: ours
    for cls, ours in (
        (getattr(hf_act, "GELUActivation", None), "gelu"),
        (getattr(hf_act, "NewGELUActivation", None), "gelu_tanh"),
        (getattr(hf_act, "GELUTanh", None), "gelu_tanh"),
        (getattr(hf_act, "PytorchGELUTanh", None), "gelu_tanh"),  # older name of GELUTanh
        (nn.ReLU, "relu"),
        (nn.SiLU, "silu"),
        (getattr(hf_act, "SiLUActivation", None), "silu"),
        (getattr(hf_act, "LinearActivation", None), "identity"),
        (nn.Identity, "identity"),
    )
    if cls is not None
}


@dataclass
class _Fused:
    activation: str
    backend: str
    adapters_config: object  # the model's ModelAdaptersConfig: tells whether a Fuse block is active


def _activation(adapter: Adapter) -> Optional[str]:
    return _ACTIVATIONS.get(type(adapter.non_linearity.f))


def _why_not(adapter: nn.Module) -> Optional[str]:
    """Why the fused op cannot compute this adapter, or None."""
    if type(adapter) is not Adapter:  # ParallelAdapter adds its residual in post_forward
        return f"{type(adapter).__name__} is not a sequential bottleneck adapter"
    if adapter.add_layer_norm_before or adapter.add_layer_norm_after:
        return "ln_before/ln_after: a layer norm inside the adapter"
    if adapter.use_gating:
        return "use_gating: a learned gate on the adapter output"
    if hasattr(adapter, "DropPath"):
        return "stochastic_depth > 0"
    if isinstance(adapter.scaling, Tensor):
        return "learned or per-channel scaling"
    if _activation(adapter) is None:
        return f"non_linearity {type(adapter.non_linearity.f).__name__} has no fused equivalent"
    layers = (*adapter.adapter_down, adapter.adapter_up)
    if len(layers) != 3 or not (all(isinstance(m, PHMLayer) for m in layers[::2])
                                or all(type(m) is nn.Linear for m in layers[::2])):
        return "unrecognised adapter_down / adapter_up layers"
    return None


def _phm_keys(layer: PHMLayer) -> tuple:
    """(rule keys, rule shared, W keys, W shared): where PHMLayer.forward finds its factors (its
    own parameters, or the shared ones of the ForwardContext), fixed by its config; read once
    per layer and kept on it (host time: nn.Module attribute lookups on every call)."""
    keys = layer.__dict__.get("_ck_phm_keys")
    if keys is None:
        w = f"W_{layer.position}" if layer.shared_W_phm else "W"  # shared: W_down_left, ...; own: W_left, ...
        keys = (("phm_rule_left", "phm_rule_right") if layer.factorized_phm_rule else ("phm_rule",),
                layer.shared_phm_rule, (w + "_left", w + "_right") if layer.factorized_phm_W else (w,),
                layer.shared_W_phm)
        layer.__dict__["_ck_phm_keys"] = keys
    return keys


def _phm_args(layer: PHMLayer, context: Optional[ForwardContext] = None) -> tuple:
    """(rule, left, right, bias) of a PHMLayer, found where PHMLayer.forward finds them (the
    shared ones in ``context``, by default the current ForwardContext)."""
    rule_keys, rule_shared, w_keys, w_shared = _phm_keys(layer)
    own = layer._parameters
    shared = own
    if rule_shared or w_shared:
        if context is None:
            context = _innermost(ForwardContext)
        shared = context.shared_parameters[layer.name]
        if isinstance(shared, nn.ParameterDict):  # its own dict: ParameterDict[key] is a getattr (host time)
            shared = shared._parameters
    w, r = shared if w_shared else own, shared if rule_shared else own
    left, right = (w[w_keys[0]], w[w_keys[1]]) if len(w_keys) == 2 else (w[w_keys[0]], None)
    rule = torch.bmm(r[rule_keys[0]], r[rule_keys[1]]) if len(rule_keys) == 2 else r[rule_keys[0]]
    return rule, left, right, own["b"]


def _innermost(context_class):
    """``context_class.get_context()`` (AdapterSetup, ForwardContext: the innermost of a
    thread-local stack, or None) without its IndexError on an empty stack (host time)."""
    contexts = getattr(context_class.storage, "contexts", None)
    return contexts[-1] if contexts else None


def _has_fuse(setup) -> bool:
    if type(setup) is str:  # an adapter's name (the common leaf): no Fuse
        return False
    if isinstance(setup, Fuse):
        return True
    if not isinstance(setup, AdapterCompositionBlock):
        return False
    # .children, not iteration: a block is a Sequence, iterated by __getitem__ until IndexError (host time)
    for child in setup.children:
        if type(child) is not str and _has_fuse(child):
            return True
    return False


def _fuse_active(adapters_config) -> bool:
    # Same lookup as ComposableAdapterLayerBase.get_active_setup: the AdapterSetup context, then the model's.
    context = _innermost(AdapterSetup)
    return _has_fuse(context.adapter_setup if context is not None else adapters_config.active_setup)


def _fused_forward(self: Adapter, x: Tensor, residual_input: Tensor, output_gating: bool = False):
    """Adapter.forward on the fused op: returns (output, down, up) as the library does.

    The library's only caller (BottleneckLayer.compose_single) reads `down`/`up` for Fuse
    compositions and gating scores alone; those, dropout while training, and odd residual shapes
    take the library's path, so the fused path returns None for them and never materialises them
    (`_pad_and_concat` lets BatchSplit / Parallel join such a None with a library adapter's `up`).
    """
    spec = self._ck_fused
    modules = self._modules  # direct lookups: nn.Module.__getattr__ on every call costs host time
    # output_gating (the ForwardContext's output_adapter_gating_scores): compose_single stores the
    # last element returned as the adapter's gating score, here `up`, which the fused op never forms.
    if (output_gating or (self.training and modules["dropout"].p > 0) or residual_input is None
            or residual_input.shape != x.shape or _fuse_active(spec.adapters_config)):
        return Adapter.forward(self, x, residual_input, output_gating)
    down, up = modules["adapter_down"]._modules["0"], modules["adapter_up"]
    residual = None if residual_input is x else residual_input
    # Mixed dtypes under autocast (fp32 parameters, bf16 x) are handled by the op as eager would.
    if isinstance(up, PHMLayer):
        context = _innermost(ForwardContext)  # once for both projections (host time)
        out = F.compacter_adapter(x, *_phm_args(down, context), *_phm_args(up, context), activation=spec.activation,
                                  scale=float(self.scaling), residual=residual, backend=spec.backend)
    else:  # nn.Linear stores (out, in): passed as they are (the kernels read the .t() views without a copy)
        d, u = down._parameters, up._parameters
        out = F._adapter_linear(x, d["weight"], d["bias"], u["weight"], u["bias"], activation=spec.activation,
                                scale=float(self.scaling), residual=residual, backend=spec.backend)
    return out, None, None


def _same_kind(adapters: list) -> bool:
    """Fused adapters one multitask call can run together: one activation, scaling, backend and
    layer kind, and parameters of the same shapes."""
    a0 = adapters[0]

    def kind(a):
        layers = (a.adapter_down[0], a.adapter_up)
        if isinstance(a.adapter_up, PHMLayer):
            shapes = tuple(None if t is None else tuple(t.shape) for m in layers for t in _phm_args(m))
        else:
            shapes = tuple(None if t is None else tuple(t.shape) for m in layers for t in (m.weight, m.bias))
        return (a._ck_fused.activation, a._ck_fused.backend, float(a.scaling), type(a.adapter_up), shapes)

    return all("_ck_fused" in vars(a) for a in adapters) and all(kind(a) == kind(a0) for a in adapters)


def _stack(tensors: list, shared_as_is: bool = False) -> Optional[Tensor]:
    """The tasks' tensors stacked, task dimension first (None for absent ones); with
    ``shared_as_is``, one tensor they all share is passed as it is (a rule the tasks share)."""
    if tensors[0] is None:
        return None
    if shared_as_is and all(t is tensors[0] for t in tensors):
        return tensors[0]
    return torch.stack(tensors)


def _task_sizes(batch_sizes: list, n_tasks: int, bsz: int) -> Optional[list]:
    """The rows of each of the ``n_tasks`` children, as the library's compose_batch_split slices
    them (child i: rows sum(batch_sizes[:i]) to sum(batch_sizes[:i+1])), or None where they do not
    partition the ``bsz`` rows. A list shorter than the children leaves the last ones no rows:
    MultiTask builds it with bincount, which ends at the highest task present."""
    if min(batch_sizes, default=0) < 0 or sum(batch_sizes) != bsz or sum(batch_sizes[:n_tasks]) != bsz:
        return None
    return list(batch_sizes[:n_tasks]) + [0] * (n_tasks - len(batch_sizes))


def _gating_wanted() -> bool:
    """Whether the forward stores gating scores (compose_single, per adapter and slice)."""
    context = _innermost(ForwardContext)
    return context is not None and bool(context.output_adapter_gating_scores)


def _fused_batch_split(self: BottleneckLayer, adapter_setup: BatchSplit, state, lvl: int = 0):
    """BottleneckLayer.compose_batch_split on one multitask call: a BatchSplit (and so a MultiTask,
    which the library turns into one) of fused adapters of one kind runs as
    ck.multitask_compacter_adapter / ck.multitask_adapter over stacked parameters, each slice of
    the batch through its adapter (a child with no rows too: its gradients are zeros, as the
    library's empty slice gives); anything else takes the library's path."""
    names = list(adapter_setup)
    adapters = [self.adapters[c] if isinstance(c, str) and c in self.adapter_modules else None for c in names]
    library = lambda: BottleneckLayer.compose_batch_split(self, adapter_setup, state, lvl)  # noqa: E731
    if not adapters or None in adapters or not _same_kind(adapters):
        return library()
    sizes = _task_sizes(adapter_setup.batch_sizes, len(names), self._bsz(state))
    if (sizes is None or _fuse_active(adapters[0]._ck_fused.adapters_config) or _gating_wanted()
            or any(a.training and a.dropout.p > 0 for a in adapters)):
        return library()
    pre = self.pre_block(adapter_setup, state)  # the first adapter's, for the whole batch (as the library)
    x, residual = pre.hidden_states, pre.adapter_residual
    if residual is None or residual.shape != x.shape:
        return library()
    ids = torch.repeat_interleave(torch.arange(len(names), device=x.device),
                                  torch.tensor(sizes, device=x.device))
    ids = ids.reshape(-1, *([1] * (x.dim() - 2)))  # one task per sequence
    spec, a0 = adapters[0]._ck_fused, adapters[0]
    kwargs = dict(activation=spec.activation, scale=float(a0.scaling), backend=spec.backend,
                  residual=None if residual is x else residual)
    if isinstance(a0.adapter_up, PHMLayer):
        down, up = ([_phm_args(a.adapter_down[0]) for a in adapters], [_phm_args(a.adapter_up) for a in adapters])
        # Each task's rule shared by its two projections: one stacked rule for both, whose gradient
        # the kernel sums (stacked twice, autograd would add the two per task).
        one_rule = all(d[0] is u[0] for d, u in zip(down, up))
        args = []
        for projection in (down, up):
            rule, left, right, bias = zip(*projection)
            rules = args[0] if one_rule and args else _stack(list(rule), shared_as_is=True)
            args += [rules, _stack(list(left)), _stack(list(right)), _stack(list(bias))]
        out = F.multitask_compacter_adapter(x, ids, *args, **kwargs)
    else:  # nn.Linear stores (out, in): the op takes the (in, out) transposes
        layers = [(a.adapter_down[0], a.adapter_up) for a in adapters]
        out = F.multitask_adapter(x, ids, _stack([d.weight.t() for d, _ in layers]),
                                  _stack([d.bias for d, _ in layers]), _stack([u.weight.t() for _, u in layers]),
                                  _stack([u.bias for _, u in layers]), **kwargs)
    return pre._replace(hidden_states=out, bottleneck_up=None, last=names[-1])


def _pad_and_concat(self: BottleneckLayer, states: list):
    """BottleneckLayer.pad_and_concat (BatchSplit, Parallel), where a fused child's ``bottleneck_up``
    is None beside a library child's tensor (an unfused adapter, dropout while training): the
    joined ``up`` is then None too. Only a Fuse reads it, and under a Fuse no adapter is fused."""
    if any(s.bottleneck_up is None for s in states):
        states = [s._replace(bottleneck_up=None) for s in states]
    return BottleneckLayer.pad_and_concat(self, states)


def _bottleneck_adapters(model: nn.Module):
    """(path, adapter name, adapter module, owning BottleneckLayer) for every bottleneck adapter."""
    for path, layer in model.named_modules():
        if isinstance(layer, BottleneckLayer):
            for name, adapter in layer.adapters.items():
                yield f"{path}.adapters.{name}", name, adapter, layer


def fuse_adapters(model: nn.Module, backend: str = "auto") -> list[str]:
    """Switch every compatible AdapterHub bottleneck adapter of ``model`` to the fused op, in place.

    Returns the module paths switched. Calling it again (e.g. after adding or loading another
    adapter) switches the new ones too. Incompatible adapters keep the library's path, with one
    warning per adapter and reason on the "compacter_kernels" logger.
    """
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        status = available_backends()[backend]
        if not status:
            raise RuntimeError(f"backend {backend!r} cannot run here: {status.reason}")
    switched, skipped, eval_only = [], defaultdict(list), defaultdict(list)
    for path, name, adapter, layer in _bottleneck_adapters(model):
        why = _why_not(adapter)
        if why is not None:
            skipped[name, why].append(path)
            continue
        # Instance attribute: nn.Module.__call__ picks it over Adapter.forward; deleting it undoes.
        adapter._ck_fused = _Fused(_activation(adapter), backend, layer.adapters_config)
        adapter.forward = types.MethodType(_fused_forward, adapter)
        layer.compose_batch_split = types.MethodType(_fused_batch_split, layer)
        layer.pad_and_concat = types.MethodType(_pad_and_concat, layer)
        switched.append(path)
        if adapter.dropout.p > 0:
            eval_only[name, adapter.dropout.p].append(path)
    for (name, why), paths in skipped.items():
        logger.warning("adapter %r keeps the AdapterHub path in %d module(s) (e.g. %s): %s",
                       name, len(paths), paths[0], why)
    for (name, p), paths in eval_only.items():
        logger.warning("adapter %r has dropout=%g: fused in eval mode only, the AdapterHub path while "
                       "training (%d module(s))", name, p, len(paths))
    return switched


def unfuse_adapters(model: nn.Module) -> list[str]:
    """Undo :func:`fuse_adapters`: every adapter runs the library's own forward again."""
    restored = []
    for path, _, adapter, layer in _bottleneck_adapters(model):
        if "_ck_fused" in vars(adapter):
            del adapter.forward, adapter._ck_fused
            restored.append(path)
        vars(layer).pop("compose_batch_split", None)
        vars(layer).pop("pad_and_concat", None)
    return restored
