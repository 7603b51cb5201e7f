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


# What needs a newer torch than the oldest supported (setup.py's MIN_TORCH; scripts/test_oldest.sh runs it):
# skipped below that version, with the reason.
NEEDS_NEWER_TORCH = {
    "tests/test_hardening.py::test_fsdp2_gloo_loss_and_gradients_equal_the_single_process_run": (
        (2, 9), "FSDP2 on CPU (gloo) with a rule shared across sharded adapters needs torch >= 2.9 (torch 2.6: "
                "no torch.cpu.Stream.record_event; 2.7 and 2.8: the shared rule's gradient differs)"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        need = NEEDS_NEWER_TORCH.get(item.nodeid.split("[")[0])
        if need and torch.__version__ < need[0]:
            item.add_marker(pytest.mark.skip(reason=need[1]))
