import os
import zlib

import pytest
import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter. This must happen before
# compacter_kernels is imported: the kernels are decorated at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
