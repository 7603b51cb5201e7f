"""Every Python block of README.md runs as written, each in a fresh process (a new user's)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import checkout_env

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
# Packages a block may need that the core package does not (the [integrations] extra).
OPTIONAL = ("adapters", "transformers")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block):
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600,
                          env=checkout_env())
    missing = [name for name in OPTIONAL if f"No module named '{name}'" in proc.stderr]
    if proc.returncode and missing:
        pytest.skip(f"the block needs {missing[0]}, which is not installed")
    assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stderr[-3000:]}"
