"""The examples in examples/ run as the README says (a few steps each, CPU or GPU)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from utils import checkout_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_bert_compacter.py"


@pytest.mark.parametrize("via", ["transformers", "adapterhub"])
def test_finetune_example_runs(via):
    pytest.importorskip("transformers")
    if via == "adapterhub" and importlib.util.find_spec("adapters") is None:
        pytest.skip("adapters is not installed")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--via", via, "--steps", "6", "--batch", "4", "--seq", "8"],
                          capture_output=True, text=True, timeout=600, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "trainable parameters:" in out and "backend 'auto' runs:" in out, out
    assert "mean loss, first 6 steps" in out, out
    if via == "adapterhub":
        assert "fused 4 AdapterHub adapter modules" in out, out


def test_finetune_example_rejects_zero_steps():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "0"], capture_output=True, text=True,
                          env=checkout_env())
    assert proc.returncode == 2 and "--steps: must be at least 1, got 0" in proc.stderr, proc.stderr
