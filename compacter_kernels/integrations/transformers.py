"""Compacter / Houlsby adapters in HuggingFace BERT-, RoBERTa- and T5-family models (no AdapterHub).

    model = BertForSequenceClassification(config)
    add_adapters(model, "compacter", reduction_factor=16, unfreeze=("classifier",))
    trainable, total, fraction = trainable_parameters(model)

Placement (Houlsby et al.; Compacter): an adapter ``h + f(h)`` on the output of every attention
block and every feed-forward block, before that sublayer's residual add:

    BERT / RoBERTa (``*SelfOutput``, ``*Output``):  LayerNorm(adapter(dropout(dense(h))) + input)
    T5 (``T5LayerSelfAttention``, ``T5LayerFF``):   h + dropout(adapter(sublayer(layer_norm(h))))

(Compacter++: the feed-forward ones only.) The adapter is registered on the sublayer
(``...attention.output.adapter``) and applied by a forward hook on the sublayer's child whose
output it takes (``dropout``, ``SelfAttention``, ``DenseReluDense``), so HF's forward code runs
unchanged. Modules are recognised by class name and attributes: no ``transformers`` import needed.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..nn import CompacterAdapter, HoulsbyAdapter, PHMRule

METHODS = ("compacter", "compacter++", "houlsby")


def _sites(model: nn.Module) -> list[tuple[nn.Module, nn.Module, int, bool]]:
    """(sublayer, child whose output the adapter takes, d_model, is_feed_forward) per adapter place."""
    sites = []
    for m in model.modules():
        cls = type(m).__name__
        if cls.endswith("Output") and all(hasattr(m, a) for a in ("dense", "dropout", "LayerNorm")):
            sites.append((m, m.dropout, m.dense.out_features, not cls.endswith("SelfOutput")))
        elif cls.endswith("LayerSelfAttention") and hasattr(m, "SelfAttention"):
            sites.append((m, m.SelfAttention, m.SelfAttention.o.out_features, False))
        elif cls.endswith("LayerFF") and hasattr(m, "DenseReluDense"):
            sites.append((m, m.DenseReluDense, m.DenseReluDense.wo.out_features, True))
    return sites


def _apply_adapter(module: nn.Module, args, output):
    # A module-level hook (not a closure) that finds the adapter on the hooked module, so that
    # copy.deepcopy(model) gives the copy's hooks the copy's adapters.
    adapter = module._ck_adapter
    if isinstance(output, tuple):  # T5Attention returns (attn_output, position_bias, ...)
        return (adapter(output[0]),) + output[1:]
    return adapter(output)


def add_adapters(
    model: nn.Module,
    method: str = "compacter",
    reduction_factor: float = 32,
    phm_dim: int = 4,
    rank: int = 1,
    activation: str = "gelu",
    backend: str = "auto",
    *,
    train_layer_norms: bool = False,
    unfreeze: Iterable[str] = (),
) -> nn.Module:
    """Insert adapters into ``model`` in place, freeze everything else, and return ``model``.

    ``method``: "compacter" (attention + feed-forward), "compacter++" (feed-forward only) or
    "houlsby" (dense adapters, attention + feed-forward). Compacter adapters share one
    ``PHMRule``, registered once as ``model.phm_rule``. The bottleneck is
    ``d_model // reduction_factor`` (a multiple of ``phm_dim`` for Compacter).

    Trainable afterwards: the adapters (and the rule); the model's layer norms too with
    ``train_layer_norms=True`` (the paper's setting, which its parameter counts include); and
    the submodules named in ``unfreeze`` (a last name such as "classifier", or a dotted path).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sites = _sites(model)
    if not sites:
        raise ValueError(f"no BERT/RoBERTa (*SelfOutput, *Output) or T5 (T5LayerSelfAttention, T5LayerFF) "
                         f"sublayers found in {type(model).__name__}")
    if any(hasattr(child, "_ck_adapter") for _, child, _, _ in sites):
        raise ValueError("this model already has adapters from add_adapters")
    if method == "compacter++":
        sites = [s for s in sites if s[3]]
    ref = next(model.parameters())  # adapters go to the model's device and dtype (meta included)
    rule = None
    if method != "houlsby":
        rule = model.phm_rule = PHMRule(phm_dim).to(ref.device, ref.dtype)
    for sublayer, child, d, _ in sites:
        if method == "houlsby":
            adapter = HoulsbyAdapter(d, int(d // reduction_factor), activation, backend)
        else:
            adapter = CompacterAdapter(d, reduction_factor, phm_dim=phm_dim, rank=rank, activation=activation,
                                       rule=rule, backend=backend)
        sublayer.adapter = adapter.to(ref.device, ref.dtype)
        object.__setattr__(child, "_ck_adapter", adapter)  # unregistered: counted once, on the sublayer
        child.register_forward_hook(_apply_adapter)

    model.requires_grad_(False)
    unfreeze = set(unfreeze)
    for name, m in model.named_modules():
        if (isinstance(m, (CompacterAdapter, HoulsbyAdapter, PHMRule)) or name in unfreeze
                or name.rsplit(".", 1)[-1] in unfreeze
                or (train_layer_norms and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")))):
            m.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameter counts; a shared tensor counts once."""
    params = list(model.parameters())  # parameters() already yields each tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total, (trainable / total if total else 0.0)


def adapters_of(model: nn.Module) -> list[nn.Module]:
    """The adapters that :func:`add_adapters` inserted, in model order."""
    return [m for m in model.modules() if isinstance(m, (CompacterAdapter, HoulsbyAdapter))]


__all__ = ["METHODS", "add_adapters", "adapters_of", "trainable_parameters"]
