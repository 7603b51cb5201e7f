import os
import zlib

import pytest
import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter. This must happen before
# compacter_kernels is imported: the kernels are decorated at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# COMPACTER_KERNELS_EMULATE_CUDA=1 without a GPU: the cuda backend's kernels run in the CPU
# emulator (tests/emulation.py), before the test modules list their backends.
import emulation  # noqa: E402

if emulation.requested() and not torch.cuda.is_available():
    emulation.enable()


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
