"""The built CUDA extension's machine code, read without a GPU: the fp16/bf16 adapter kernels
use the tensor cores (HMMA in the SASS of every arch built) and no kernel spills more than a
few bytes. The CUDA counterpart of test_triton_compile.py, with the cuobjdump Triton ships."""

import os
import re
import subprocess
from collections import defaultdict

import pytest

from compacter_kernels import _extension

KERNELS = ("adapter_fwd_kernel", "adapter_bwd_kernel", "rows_tn_kernel")
TYPES = {"IN3c104HalfE": "fp16", "IN3c108BFloat16E": "bf16", "IfE": "fp32"}


def _cuobjdump(*args: str) -> str:
    ext = _extension.load()
    if ext is None:
        pytest.skip(f"the CUDA extension is not loaded: {_extension.status()[1]}")
    try:
        import triton
    except ImportError:
        pytest.skip("cuobjdump comes with triton, which is not installed")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"no cuobjdump at {tool}")
    return subprocess.run([tool, *args, ext.__file__], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def _per_function(text: str, function_line: str) -> dict[tuple[str, str], list[str]]:
    """{(arch, mangled function name): its lines} of a cuobjdump listing."""
    out, arch, fn = defaultdict(list), None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch, fn = m.group(1), None
        elif m := re.match(function_line, line):
            fn = m.group(1)
        elif fn is not None:
            out[(arch, fn)].append(line)
    return out


def _label(fn: str):
    """(kernel, dtype) of an adapter kernel's mangled name, else None."""
    for kernel in KERNELS:
        if kernel in fn:
            return kernel, next(t for code, t in TYPES.items() if fn.split(kernel, 1)[1].startswith(code))
    return None


def test_fp16_and_bf16_kernels_use_the_tensor_cores():
    sass = _per_function(_cuobjdump("-sass"), r"\s*Function : (\S+)")
    hmma = {(arch, *_label(fn)): sum("HMMA" in line for line in lines)
            for (arch, fn), lines in sass.items() if _label(fn)}
    archs = {arch for arch, _, _ in hmma}
    assert {"sm_80", "sm_90"} <= archs, f"archs built: {sorted(archs)}"
    assert len(hmma) == len(archs) * len(KERNELS) * len(TYPES), sorted(hmma)
    for (arch, kernel, dtype), count in sorted(hmma.items()):
        if dtype == "fp32":  # exact fp32 FMAs by design (no TF32)
            assert count == 0, f"{arch} {kernel} fp32: {count} HMMA"
        else:
            assert count > 0, f"{arch} {kernel} {dtype}: no HMMA in the SASS"


def test_no_kernel_spills():
    usage = _per_function(_cuobjdump("--dump-resource-usage"), r"\s*Function (\S+):")
    assert usage, "no functions in the resource usage listing"
    for (arch, fn), lines in usage.items():
        res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", " ".join(lines))}
        # A few bytes of stack are the dtype switch's frame (16 at most when measured); more is a spill.
        assert res["LOCAL"] == 0 and res["STACK"] <= 32, f"{arch} {fn}: {res}"
        assert res["REG"] <= 255, f"{arch} {fn}: {res}"
