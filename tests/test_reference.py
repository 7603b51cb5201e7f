"""The reference's building blocks that are no op: the activations and the initialisation. (Each
op's reference against itself, two formulations and gradcheck in float64, is in that op's file.)"""

import pytest
import torch

from compacter_kernels import reference as ref


def test_activations_match_their_definitions():
    z = torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(ref.activation_fn("gelu")(z), 0.5 * z * (1 + torch.erf(z / 2**0.5)))
    c = (2 / torch.pi) ** 0.5
    torch.testing.assert_close(ref.activation_fn("gelu_tanh")(z), 0.5 * z * (1 + torch.tanh(c * (z + 0.044715 * z**3))))
    torch.testing.assert_close(ref.activation_fn("silu")(z), z * torch.sigmoid(z))
    torch.testing.assert_close(ref.activation_fn("relu")(z), z.clamp_min(0))
    torch.testing.assert_close(ref.activation_fn("identity")(z), z)
    with pytest.raises(ValueError, match="activation"):
        ref.activation_fn("tanh")


def test_glorot_uniform_bounds_per_slice():
    t = torch.empty(4, 100, 3)
    ref.glorot_uniform_(t)
    bound = (6 / 103) ** 0.5
    assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
