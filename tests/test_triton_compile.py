"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one: no register spills, and
tensor-core instructions in the SASS. Catches what the CPU interpreter cannot (compile errors,
a tile choice that spills) before a GPU session does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils import checkout_env

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "triton_resources.py"


def _compile(arch: int, dtype: str):
    env = checkout_env(drop=("TRITON_INTERPRET",))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--dtype", dtype, "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,dtype", [(90, "bf16"), (80, "fp16")])
def test_adapter_kernels_compile_on_tensor_cores_without_spills(arch, dtype):
    rows = _compile(arch, dtype)
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "cols", "grads", "build_h", "reduce", "group"}
    for r in rows:
        what = f"sm_{arch} {dtype} {r['kernel']} {r['case']}"
        if r["kernel"] not in ("grads", "build_h", "group"):  # those make no matrix product
            assert r["HGMMA"] + r["HMMA"] > 0, f"{what}: no tensor-core instructions"
        # The widest bottleneck's backward may keep a few bytes of stack; anything more is a spill.
        assert r["STACK"] <= (32 if "k=256" in r["case"] else 0), f"{what}: {r['STACK']} bytes of stack"
