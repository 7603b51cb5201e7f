"""torch.compile(model, fullgraph=True) of a small BERT with fused adapters (through fuse_adapters,
with a BatchSplit, and through add_adapters): one training step in a fresh process, no graph
break, the eager loss and every gradient, on each backend this process runs (the cuda backend in
the emulated run). The child is tests/compile_models.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import emulation
from utils import why_backend_cannot_run

HERE = Path(__file__).resolve().parent
pytest.importorskip("adapters")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_a_compiled_bert_with_fused_adapters_trains_as_eager(backend):
    why = why_backend_cannot_run(backend)
    if emulation.requested() and backend != "cuda":
        why = "runs in the main test run"
    if why is not None:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(HERE / "compile_models.py"), backend], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]  # the emulator's build talks too
    assert done == ["ok fuse_adapters", "ok batch_split", "ok add_adapters"], proc.stdout
