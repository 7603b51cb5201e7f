"""The CUDA phm_weight kernel in the CPU emulator (the adapter kernels run through
tests/test_kernels.py and tests/test_hardening.py in the same emulated run).

Runs only with COMPACTER_KERNELS_EMULATE_CUDA=1 and no GPU (see tests/emulation.py); on a GPU,
tests/test_extension.py runs this kernel for real.
"""

import pytest
import torch

from compacter_kernels import reference as ref
from utils import CUDA_EMULATED, phm_factors

pytestmark = pytest.mark.skipif(not CUDA_EMULATED, reason="runs in the emulated run: COMPACTER_KERNELS_EMULATE_CUDA=1 "
                                                          "without a GPU (scripts/test.sh does it)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,I,O,rank", [(2, 6, 10, 1), (4, 36, 20, 4), (8, 16, 24, None), (4, 44, 12, 2)])
def test_phm_weight_kernel_matches_the_reference(dtype, n, I, O, rank):
    rule, left, right = phm_factors(n, I, O, rank, dtype=dtype)
    out = torch.ops.compacter_kernels.phm_weight(rule, left, right)
    # The kernel sums in fp32 (fp64 for fp64) and rounds once.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = ref.phm_weight(*(None if t is None else t.to(acc) for t in (rule, left, right))).to(dtype)
    assert out.shape == (I, O) and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten elements (the output starts as NaN)"
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 0.0)
    # Low precision: at most one rounding step apart (the order of the fp32 sum differs).
    step = torch.finfo(dtype).eps * expected.double().abs().clamp_min(1e-3)
    bound = tol * max(1.0, expected.double().abs().max().item()) if tol else step
    assert ((out.double() - expected.double()).abs() <= bound).all()
