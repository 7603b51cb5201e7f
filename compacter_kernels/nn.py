"""Drop-in layers: PHMLinear, CompacterAdapter, HoulsbyAdapter, the shared PHMRule, and the
multi-task banks CompacterAdapterBank and HoulsbyAdapterBank.

Parameter names and shapes follow the original Compacter code and AdapterHub's ``PHMLayer``
(``phm_rule (n,n,n)``, ``W_left (n, I/n, r)``, ``W_right (n, r, O/n)``, ``W (n, I/n, O/n)``,
``b``), so their weights load without reshaping.

Sharing a rule: build one ``PHMRule``, register it once on your model (``model.phm_rule = rule``)
and pass it as ``rule=`` to every layer. The layers keep an unregistered reference to it, so
it is counted once in ``parameters()`` and ``state_dict()``, wherever it is used.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import check_activation, check_scale
from .reference import factorized_rule, glorot_uniform_

PHM_INIT_RANGE = 1e-4  # std of the rule's normal init in the paper's code (phm_init_range)
HOULSBY_INIT_STD = 1e-2  # near-identity init of Houlsby et al.


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_divisible(name: str, value: int, n: int) -> None:
    _check_int(name, value)
    if value % n:
        raise ValueError(f"{name}={value} must be a positive multiple of phm_dim={n}")


class PHMRule(nn.Module):
    """The shared "slow" weights A: ``phm_rule (n, n, n)``.

    With ``factorized=True`` it is ``phm_rule_left (n, n, 1) @ phm_rule_right (n, 1, n)``, as the
    paper's ``factorized_phm_rule`` option. Calling the module returns the (n, n, n) rule.
    """

    def __init__(self, phm_dim: int = 4, factorized: bool = False, init_range: float = PHM_INIT_RANGE):
        super().__init__()
        _check_int("phm_dim", phm_dim)
        self.phm_dim = phm_dim
        self.factorized = factorized
        n = phm_dim
        if factorized:
            self.phm_rule_left = nn.Parameter(torch.empty(n, n, 1).normal_(0.0, init_range))
            self.phm_rule_right = nn.Parameter(torch.empty(n, 1, n).normal_(0.0, init_range))
        else:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n).normal_(0.0, init_range))

    def forward(self) -> Tensor:
        return factorized_rule(self.phm_rule_left, self.phm_rule_right) if self.factorized else self.phm_rule

    def extra_repr(self) -> str:
        return f"phm_dim={self.phm_dim}, factorized={self.factorized}"


class PHMLinear(nn.Module):
    """y = x @ H + b, H = sum_i kron(A_i, W_left_i @ W_right_i) (in_features, out_features).

    ``rule=None`` gives the layer its own ``phm_rule`` parameter; a ``PHMRule`` shares one.
    ``factorized=False`` keeps the full per-slice weight ``W (n, I/n, O/n)`` (PHM-Adapter).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_dim: int = 4,
        rank: int = 1,
        factorized: bool = True,
        bias: bool = True,
        rule: Optional[PHMRule] = None,
        backend: str = "auto",
    ):
        super().__init__()
        n = phm_dim
        _check_int("phm_dim", n)
        _check_divisible("in_features", in_features, n)
        _check_divisible("out_features", out_features, n)
        _check_int("rank", rank)
        if rule is not None and not isinstance(rule, PHMRule):
            raise TypeError(f"rule must be a compacter_kernels.nn.PHMRule or None, got {type(rule).__name__}")
        if rule is not None and rule.phm_dim != n:
            raise ValueError(f"the shared rule has phm_dim={rule.phm_dim} but this layer has phm_dim={n}")
        self.in_features, self.out_features = in_features, out_features
        self.phm_dim, self.rank, self.factorized = n, rank, factorized
        self.backend = backend
        # Not registered as a submodule: the owner registers a shared rule once (see module doc).
        object.__setattr__(self, "shared_rule", rule)
        if rule is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n))
        if factorized:
            self.W_left = nn.Parameter(torch.empty(n, in_features // n, rank))
            self.W_right = nn.Parameter(torch.empty(n, rank, out_features // n))
        else:
            self.W = nn.Parameter(torch.empty(n, in_features // n, out_features // n))
        self.b = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.shared_rule is None:
            nn.init.normal_(self.phm_rule, 0.0, PHM_INIT_RANGE)
        for w in (self.W_left, self.W_right) if self.factorized else (self.W,):
            glorot_uniform_(w)
        if self.b is not None:
            nn.init.zeros_(self.b)

    def rule(self) -> Tensor:
        return self.phm_rule if self.shared_rule is None else self.shared_rule()

    def factors(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(rule, left, right): the arguments of ck.phm_weight / ck.phm_linear."""
        if self.factorized:
            return self.rule(), self.W_left, self.W_right
        return self.rule(), self.W, None

    def weight(self) -> Tensor:
        """The dense H (in_features, out_features), for inspection or export."""
        return F.phm_weight(*self.factors())

    def forward(self, x: Tensor) -> Tensor:
        return F.phm_linear(x, *self.factors(), self.b, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}, "
                f"rank={self.rank}, factorized={self.factorized}, bias={self.b is not None}, "
                f"shared_rule={self.shared_rule is not None}")


def _bottleneck(d_model: int, reduction_factor: Optional[float], bottleneck: Optional[int]) -> int:
    _check_int("d_model", d_model)
    if bottleneck is None:
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, numbers.Real):
            raise TypeError(f"reduction_factor must be a real number, got {type(reduction_factor).__name__}")
        if not math.isfinite(reduction_factor) or reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be a finite number > 0, got {reduction_factor}")
        bottleneck = int(d_model // reduction_factor)
        if bottleneck < 1:
            raise ValueError(f"d_model={d_model} // reduction_factor={reduction_factor} gives a bottleneck of "
                             f"{bottleneck}: it must be >= 1")
    _check_int("bottleneck", bottleneck)
    return bottleneck


class CompacterAdapter(nn.Module):
    """Compacter bottleneck adapter: y = r + scale * (act(x @ H_down + b) @ H_up + b), r = x.

    The bottleneck is ``bottleneck`` or ``d_model // reduction_factor`` (the paper: 32).
    One rule serves both projections: the ``rule`` given (shared across the model), or one
    this adapter owns (registered here as ``phm_rule``).
    """

    def __init__(
        self,
        d_model: int,
        reduction_factor: Optional[float] = 32,
        bottleneck: Optional[int] = None,
        phm_dim: int = 4,
        rank: int = 1,
        activation: str = "gelu",
        rule: Optional[PHMRule] = None,
        backend: str = "auto",
        factorized: bool = True,
        scale: float = 1.0,
    ):
        super().__init__()
        check_activation(activation)
        check_scale(scale)
        k = _bottleneck(d_model, reduction_factor, bottleneck)
        _check_int("phm_dim", phm_dim)
        _check_divisible("d_model", d_model, phm_dim)
        _check_divisible("the bottleneck", k, phm_dim)
        if rule is None:
            rule = self.phm_rule = PHMRule(phm_dim)
        self.d_model, self.bottleneck, self.activation, self.scale = d_model, k, activation, scale
        self.backend = backend
        self.down = PHMLinear(d_model, k, phm_dim, rank, factorized, True, rule, backend)
        self.up = PHMLinear(k, d_model, phm_dim, rank, factorized, True, rule, backend)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        rule_down, left_down, right_down = self.down.factors()
        rule_up, left_up, right_up = self.up.factors()
        return F.compacter_adapter(
            x, rule_down, left_down, right_down, self.down.b, rule_up, left_up, right_up, self.up.b,
            activation=self.activation, scale=self.scale, residual=residual, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"


def _houlsby_init(adapter) -> None:
    """Houlsby's init (a near-identity adapter): weights truncated normal(0, HOULSBY_INIT_STD) at
    two standard deviations, zero biases; per task alike in a bank."""
    for w in (adapter.w_down, adapter.w_up):
        nn.init.trunc_normal_(w, std=HOULSBY_INIT_STD, a=-2 * HOULSBY_INIT_STD, b=2 * HOULSBY_INIT_STD)
    nn.init.zeros_(adapter.b_down)
    nn.init.zeros_(adapter.b_up)


class HoulsbyAdapter(nn.Module):
    """Dense bottleneck adapter (Houlsby et al.): y = r + scale * (act(x @ w_down + b_down) @ w_up + b_up).

    ``w_down`` is (d_model, bottleneck) and ``w_up`` (bottleneck, d_model): the transposes of
    ``nn.Linear.weight``. Initialised near identity (small normal weights, zero biases).
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu", backend: str = "auto",
                 scale: float = 1.0):
        super().__init__()
        check_activation(activation)
        check_scale(scale)
        _check_int("d_model", d_model)
        _check_int("bottleneck", bottleneck)
        self.d_model, self.bottleneck, self.activation, self.scale = d_model, bottleneck, activation, scale
        self.backend = backend
        self.w_down = nn.Parameter(torch.empty(d_model, bottleneck))
        self.b_down = nn.Parameter(torch.empty(bottleneck))
        self.w_up = nn.Parameter(torch.empty(bottleneck, d_model))
        self.b_up = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _houlsby_init(self)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return F.adapter(x, self.w_down, self.b_down, self.w_up, self.b_up, activation=self.activation,
                         scale=self.scale, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"


# ---- banks: T tasks' adapters in one layer, one task per row -----------------------------------

def _task_ids_of(task_ids) -> Tensor:
    return task_ids if isinstance(task_ids, Tensor) else torch.as_tensor(task_ids)


class CompacterAdapterBank(nn.Module):
    """``num_tasks`` Compacter adapters of one shape, their fast weights stacked per task
    (``down_W_left (T, n, d/n, r)``, ``down_W_right (T, n, r, k/n)``, ``down_b (T, k)``, likewise
    ``up_*``; ``*_W (T, n, ., .)`` when not factorized); ``forward(x, task_ids)`` sends row i
    through task ``task_ids[i]``'s adapter (`ck.multitask_compacter_adapter`). The rule: the
    ``rule`` given (a ``PHMRule`` shared with the rest of the model), else one the bank owns,
    ``phm_rule``: shared by the tasks (n, n, n), or per task (T, n, n, n) with ``rule_per_task``.
    `from_adapters` stacks single-task ``CompacterAdapter``s; `to_adapters` splits the bank back.
    """

    def __init__(self, num_tasks: int, d_model: int, reduction_factor: Optional[float] = 32,
                 bottleneck: Optional[int] = None, phm_dim: int = 4, rank: int = 1, activation: str = "gelu",
                 rule: Optional[PHMRule] = None, backend: str = "auto", factorized: bool = True,
                 scale: float = 1.0, rule_per_task: bool = False):
        super().__init__()
        _check_int("num_tasks", num_tasks)
        check_activation(activation)
        check_scale(scale)
        k = _bottleneck(d_model, reduction_factor, bottleneck)
        _check_int("phm_dim", phm_dim)
        _check_int("rank", rank)
        _check_divisible("d_model", d_model, phm_dim)
        _check_divisible("the bottleneck", k, phm_dim)
        if rule is not None and not isinstance(rule, PHMRule):
            raise TypeError(f"rule must be a compacter_kernels.nn.PHMRule or None, got {type(rule).__name__}")
        if rule is not None and (rule.phm_dim != phm_dim or rule_per_task):
            raise ValueError("a shared rule must have this bank's phm_dim and cannot be per task")
        T, n = num_tasks, phm_dim
        self.num_tasks, self.d_model, self.bottleneck, self.phm_dim, self.rank = T, d_model, k, n, rank
        self.activation, self.scale, self.backend, self.factorized = activation, scale, backend, factorized
        object.__setattr__(self, "shared_rule", rule)  # registered by its owner (see the module doc)
        if rule is None:
            self.phm_rule = nn.Parameter(torch.empty((T, n, n, n) if rule_per_task else (n, n, n)))
        for side, (i, o) in (("down", (d_model, k)), ("up", (k, d_model))):
            if factorized:
                setattr(self, f"{side}_W_left", nn.Parameter(torch.empty(T, n, i // n, rank)))
                setattr(self, f"{side}_W_right", nn.Parameter(torch.empty(T, n, rank, o // n)))
            else:
                setattr(self, f"{side}_W", nn.Parameter(torch.empty(T, n, i // n, o // n)))
            setattr(self, f"{side}_b", nn.Parameter(torch.empty(T, o)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each task as a fresh CompacterAdapter: the rule normal(0, 1e-4), Glorot factors, zero biases."""
        if self.shared_rule is None:
            nn.init.normal_(self.phm_rule, 0.0, PHM_INIT_RANGE)
        for side in ("down", "up"):
            for name in (("W_left", "W_right") if self.factorized else ("W",)):
                for w in getattr(self, f"{side}_{name}"):
                    glorot_uniform_(w)
            nn.init.zeros_(getattr(self, f"{side}_b"))

    def rule(self) -> Tensor:
        return self.phm_rule if self.shared_rule is None else self.shared_rule()

    def _factors(self, side: str):
        if self.factorized:
            return getattr(self, f"{side}_W_left"), getattr(self, f"{side}_W_right")
        return getattr(self, f"{side}_W"), None

    def forward(self, x: Tensor, task_ids, residual: Optional[Tensor] = None) -> Tensor:
        rule = self.rule()
        (ld, rgd), (lu, rgu) = self._factors("down"), self._factors("up")
        return F.multitask_compacter_adapter(x, _task_ids_of(task_ids), rule, ld, rgd, self.down_b, rule, lu, rgu,
                                             self.up_b, activation=self.activation, scale=self.scale,
                                             residual=residual, backend=self.backend)

    @classmethod
    def from_adapters(cls, adapters, backend: Optional[str] = None) -> "CompacterAdapterBank":
        """A bank of copies of these single-task adapters' weights (one shape, activation and
        scale). Adapters that share one PHMRule give a bank that shares it; otherwise their rules
        are stacked per task (a factorized rule is stored as its product)."""
        adapters = list(adapters)
        if not adapters or not all(isinstance(a, CompacterAdapter) for a in adapters):
            raise TypeError("from_adapters takes a non-empty sequence of compacter_kernels.nn.CompacterAdapter")
        a0 = adapters[0]
        fields = lambda a: (a.d_model, a.bottleneck, a.down.phm_dim, a.down.rank, a.down.factorized,  # noqa: E731
                            a.activation, a.scale)
        if any(fields(a) != fields(a0) for a in adapters):
            raise ValueError("the adapters differ in d_model, bottleneck, phm_dim, rank, factorization, activation "
                             "or scale: a bank holds adapters of one shape")
        # One PHMRule for all, owned by none of them (a model's shared rule): the bank shares it too.
        rules = [a.down.shared_rule for a in adapters]
        owned = any(getattr(a, "phm_rule", None) is r for a, r in zip(adapters, rules))
        shared = rules[0] if all(r is rules[0] for r in rules) and not owned else None
        bank = cls(len(adapters), a0.d_model, bottleneck=a0.bottleneck, phm_dim=a0.down.phm_dim, rank=a0.down.rank,
                   activation=a0.activation, rule=shared, backend=a0.backend if backend is None else backend,
                   factorized=a0.down.factorized, scale=a0.scale, rule_per_task=shared is None)
        like = a0.down.W_left if a0.down.factorized else a0.down.W
        bank.to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            if shared is None:
                bank.phm_rule.copy_(torch.stack([a.down.rule() for a in adapters]))
            for side in ("down", "up"):
                layers = [getattr(a, side) for a in adapters]
                for name in (("W_left", "W_right") if a0.down.factorized else ("W",)):
                    getattr(bank, f"{side}_{name}").copy_(torch.stack([getattr(m, name) for m in layers]))
                getattr(bank, f"{side}_b").copy_(torch.stack([m.b for m in layers]))
        return bank

    def to_adapters(self) -> list:
        """One CompacterAdapter per task with copies of its weights (a shared rule stays shared)."""
        out = []
        for t in range(self.num_tasks):
            a = CompacterAdapter(self.d_model, bottleneck=self.bottleneck, phm_dim=self.phm_dim, rank=self.rank,
                                 activation=self.activation, rule=self.shared_rule, backend=self.backend,
                                 factorized=self.factorized, scale=self.scale)
            like = self.down_b
            a.to(device=like.device, dtype=like.dtype)
            with torch.no_grad():
                if self.shared_rule is None:
                    a.phm_rule.phm_rule.copy_(self.phm_rule[t] if self.phm_rule.dim() == 4 else self.phm_rule)
                for side in ("down", "up"):
                    layer = getattr(a, side)
                    for name in (("W_left", "W_right") if self.factorized else ("W",)):
                        getattr(layer, name).copy_(getattr(self, f"{side}_{name}")[t])
                    layer.b.copy_(getattr(self, f"{side}_b")[t])
            out.append(a)
        return out

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, d_model={self.d_model}, bottleneck={self.bottleneck}, "
                f"activation={self.activation!r}, scale={self.scale}")


class HoulsbyAdapterBank(nn.Module):
    """``num_tasks`` dense adapters of one shape: ``w_down (T, d, k)``, ``b_down (T, k)``,
    ``w_up (T, k, d)``, ``b_up (T, d)``; ``forward(x, task_ids)`` as `CompacterAdapterBank`'s."""

    def __init__(self, num_tasks: int, d_model: int, bottleneck: int, activation: str = "gelu",
                 backend: str = "auto", scale: float = 1.0):
        super().__init__()
        _check_int("num_tasks", num_tasks)
        check_activation(activation)
        check_scale(scale)
        _check_int("d_model", d_model)
        _check_int("bottleneck", bottleneck)
        T = num_tasks
        self.num_tasks, self.d_model, self.bottleneck = T, d_model, bottleneck
        self.activation, self.scale, self.backend = activation, scale, backend
        self.w_down = nn.Parameter(torch.empty(T, d_model, bottleneck))
        self.b_down = nn.Parameter(torch.empty(T, bottleneck))
        self.w_up = nn.Parameter(torch.empty(T, bottleneck, d_model))
        self.b_up = nn.Parameter(torch.empty(T, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _houlsby_init(self)

    def forward(self, x: Tensor, task_ids, residual: Optional[Tensor] = None) -> Tensor:
        return F.multitask_adapter(x, _task_ids_of(task_ids), self.w_down, self.b_down, self.w_up, self.b_up,
                                   activation=self.activation, scale=self.scale, residual=residual,
                                   backend=self.backend)

    @classmethod
    def from_adapters(cls, adapters, backend: Optional[str] = None) -> "HoulsbyAdapterBank":
        """A bank of copies of these HoulsbyAdapters' weights (one shape, activation and scale)."""
        adapters = list(adapters)
        if not adapters or not all(isinstance(a, HoulsbyAdapter) for a in adapters):
            raise TypeError("from_adapters takes a non-empty sequence of compacter_kernels.nn.HoulsbyAdapter")
        a0 = adapters[0]
        fields = lambda a: (a.d_model, a.bottleneck, a.activation, a.scale)  # noqa: E731
        if any(fields(a) != fields(a0) for a in adapters):
            raise ValueError("the adapters differ in d_model, bottleneck, activation or scale: a bank holds "
                             "adapters of one shape")
        bank = cls(len(adapters), a0.d_model, a0.bottleneck, a0.activation,
                   a0.backend if backend is None else backend, a0.scale)
        bank.to(device=a0.w_down.device, dtype=a0.w_down.dtype)
        with torch.no_grad():
            for name in ("w_down", "b_down", "w_up", "b_up"):
                getattr(bank, name).copy_(torch.stack([getattr(a, name) for a in adapters]))
        return bank

    def to_adapters(self) -> list:
        """One HoulsbyAdapter per task with copies of its weights."""
        out = []
        for t in range(self.num_tasks):
            a = HoulsbyAdapter(self.d_model, self.bottleneck, self.activation, self.backend, self.scale)
            a.to(device=self.w_down.device, dtype=self.w_down.dtype)
            with torch.no_grad():
                for name in ("w_down", "b_down", "w_up", "b_up"):
                    getattr(a, name).copy_(getattr(self, name)[t])
            out.append(a)
        return out

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, d_model={self.d_model}, bottleneck={self.bottleneck}, "
                f"activation={self.activation!r}, scale={self.scale}")
