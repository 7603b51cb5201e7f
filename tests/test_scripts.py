"""The helper scripts in scripts/ that run on a GPU, checked here in their CPU smoke modes."""
import re
import subprocess
import sys
from pathlib import Path

from utils import checkout_env

ROOT = Path(__file__).resolve().parent.parent


def test_tune_triton_blocks_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_triton_blocks.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for op in ("fwd", "bwd"):
        assert f"{op} d=32 k=8: floor" in out, out
    rows = re.findall(r"^([ *])\s+16\s+(16|32)\s+4\s+[\d.]+", out, re.M)
    assert len(rows) == 4 and sum(mark == "*" for mark, _ in rows) == 2, out  # 2 candidates per op, current marked
    assert "WRONG" not in out and out.count("best: BM=16") == 2, out
