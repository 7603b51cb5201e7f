"""The helper scripts in scripts/ that run on a GPU, checked here in their CPU smoke modes."""
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton

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


def test_gpu_quick_dry_run_writes_at_most_8_files_with_every_stage(tmp_path):
    """scripts/gpu_quick.sh --dry-run: every stage of the one-command GPU check, on tiny sizes on
    this machine, within its deadline, and what a device command can bring back (8 files, at
    most 2 folders down). COMPACTER_KERNELS_REQUIRE_EXTENSION=0 (the oldest-versions run, no
    extension) lets its build stage pass without the extension."""
    out = tmp_path / "out"
    env = {**checkout_env(), "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_quick.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    summary = (out / "summary.txt").read_text()
    for stage in ("build", "tests", "sanitize", "targets", "e2e"):
        assert re.search(rf"^  {stage}: \d+ s / \d+ s, ok$", summary, re.M), summary
    assert "commit: " in summary and "total: " in summary, summary
    # Under the versions of this test run (scripts/test_oldest.sh: the oldest declared torch).
    assert f"| torch {torch.__version__} |" in summary and f"| triton {triton.__version__}" in summary, summary
    assert re.search(r"\d+ passed", (out / "tests.log").read_text())
    assert {"targets.json", "e2e.json"} <= {p.name for p in files}
