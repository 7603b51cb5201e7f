"""compacter-kernels: fused GPU kernels for Compacter and bottleneck adapters.

    import compacter_kernels as ck
    y = ck.compacter_adapter(x, rule, S_down, T_down, b_down, rule, S_up, T_up, b_up)

Backends: "reference" (pure PyTorch), "triton", "cuda", "auto"; see ck.available_backends().
"""

from ._version import __version__  # noqa: F401

from . import nn, reference  # noqa: E402
from .backends import BACKENDS, available_backends  # noqa: E402
from .functional import (adapter, compacter_adapter, multitask_adapter, multitask_compacter_adapter,  # noqa: E402
                         phm_linear, phm_weight)

# Resolved at import, not on the first call: that call may sit inside a torch.compile'd region,
# where Dynamo cannot import the backends' modules (fullgraph=True fails in a fresh process).
available_backends()

__all__ = [
    "BACKENDS",
    "adapter",
    "available_backends",
    "compacter_adapter",
    "multitask_adapter",
    "multitask_compacter_adapter",
    "nn",
    "phm_linear",
    "phm_weight",
    "reference",
]
