"""The examples in examples/ run as the README says (a few steps each, CPU or GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest

from utils import checkout_env, installed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_bert_compacter.py"


@pytest.mark.parametrize("via", ["transformers", "adapterhub"])
def test_finetune_example_runs(via):
    pytest.importorskip("transformers")
    if via == "adapterhub" and not installed("adapters"):
        pytest.skip("adapters is not installed")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--via", via, "--steps", "6", "--batch", "4", "--seq", "8"],
                          capture_output=True, text=True, timeout=600, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "trainable parameters:" in out and "backend 'auto' runs:" in out, out
    assert "mean loss, first 3 steps" in out and "-> last 3 steps" in out, out  # two windows, no overlap
    if via == "adapterhub":
        assert "fused 4 AdapterHub adapter modules" in out, out


def test_finetune_example_rejects_zero_steps():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "0"], capture_output=True, text=True,
                          env=checkout_env())
    assert proc.returncode == 2 and "--steps: must be at least 1, got 0" in proc.stderr, proc.stderr


def test_finetune_example_help_needs_no_transformers(tmp_path):
    """--help works without transformers and shows the defaults and the extra it needs; a run
    without it says what to install."""
    blocker = tmp_path / "transformers.py"
    blocker.write_text("raise ImportError('transformers is hidden by this test')\n")
    env = checkout_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "(default: 100)" in proc.stdout and "compacter-kernels[integrations]" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "needs transformers" in proc.stderr, proc.stderr
