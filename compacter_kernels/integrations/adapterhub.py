"""Run AdapterHub (`adapters`) bottleneck adapters through the fused op, in place.

    import adapters
    adapters.init(model)
    model.add_adapter("task", config=adapters.CompacterConfig())
    model.train_adapter("task")
    fuse_adapters(model)          # Compacter / Houlsby / Pfeiffer adapters now run one fused op

Only each adapter module's ``forward`` is overridden (an instance attribute), and the override
computes with the library's OWN parameters (PHM factors, the shared ``phm_rule`` looked up in the
ForwardContext as ``PHMLayer`` does, ``nn.Linear`` weights). Parameter names, state_dicts,
``train_adapter``, ``save_adapter`` / ``load_adapter`` and optimisers therefore see the same
model. ``unfuse_adapters`` deletes the override.

What the fused op computes is ``residual + scaling * up(act(down(x)))``; an adapter using anything
else (a layer norm inside it, gating, stochastic depth, learned scaling, another activation, the
parallel form) keeps the library's path, reported in one log line per adapter and reason.
"""

from __future__ import annotations

import logging
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
from adapters.composition import AdapterCompositionBlock, Fuse
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


def _phm_args(layer: PHMLayer) -> tuple:
    """(rule, left, right, bias) of a PHMLayer, found where PHMLayer.forward finds them."""
    shared = None
    if layer.shared_phm_rule or layer.shared_W_phm:
        shared = ForwardContext.get_context().shared_parameters[layer.name]

    def get(key: str, is_shared: bool) -> Tensor:
        return shared[key] if is_shared else getattr(layer, key)

    w = f"W_{layer.position}" if layer.shared_W_phm else "W"  # shared: W_down_left, ...; own: W_left, ...
    if layer.factorized_phm_W:
        left, right = get(w + "_left", layer.shared_W_phm), get(w + "_right", layer.shared_W_phm)
    else:
        left, right = get(w, layer.shared_W_phm), None
    if layer.factorized_phm_rule:
        rule = torch.bmm(get("phm_rule_left", layer.shared_phm_rule), get("phm_rule_right", layer.shared_phm_rule))
    else:
        rule = get("phm_rule", layer.shared_phm_rule)
    return rule, left, right, layer.b


def _has_fuse(setup) -> bool:
    return isinstance(setup, Fuse) or (
        isinstance(setup, AdapterCompositionBlock) and any(_has_fuse(c) for c in setup))


def _fuse_active(adapters_config) -> bool:
    # Same lookup as ComposableAdapterLayerBase.get_active_setup: the AdapterSetup context, then the model's.
    context = AdapterSetup.get_context()
    return _has_fuse(context.adapter_setup if context is not None else adapters_config.active_setup)


def _fused_forward(self: Adapter, x: Tensor, residual_input: Tensor, output_gating: bool = False):
    """Adapter.forward on the fused op: returns (output, down, up) as the library does.

    The library's only caller (BottleneckLayer.compose_single) reads `down`/`up` for Fuse
    compositions alone; those, dropout while training, and odd residual shapes take the
    library's path, so the fused path returns None for them and never materialises them.
    """
    spec = self._ck_fused
    if ((self.training and self.dropout.p > 0) or residual_input is None or residual_input.shape != x.shape
            or _fuse_active(spec.adapters_config)):
        return Adapter.forward(self, x, residual_input, output_gating)
    down, up = self.adapter_down[0], self.adapter_up
    # Mixed dtypes under autocast (fp32 parameters, bf16 x) are handled by the op as eager would.
    kwargs = dict(activation=spec.activation, scale=float(self.scaling), backend=spec.backend,
                  residual=None if residual_input is x else residual_input)
    if isinstance(up, PHMLayer):
        out = F.compacter_adapter(x, *_phm_args(down), *_phm_args(up), **kwargs)
    else:  # nn.Linear stores (out, in): the op takes the (in, out) transpose, a free view
        out = F.adapter(x, down.weight.t(), down.bias, up.weight.t(), up.bias, **kwargs)
    return out, None, None


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
    for path, _, adapter, _ in _bottleneck_adapters(model):
        if "_ck_fused" in vars(adapter):
            del adapter.forward, adapter._ck_fused
            restored.append(path)
    return restored
