"""The CUDA kernels in the CPU emulator, beyond what the op files (tests/test_<op>.py) and
tests/test_hardening.py run through the cuda backend in the same emulated run: build_h and
phm_grads, the adapter ops' argument errors, the choice of which rows stay in shared memory, and a
shared-memory race check.

Runs only with COMPACTER_KERNELS_EMULATE_CUDA=1 and no GPU (see tests/emulation.py); on a GPU
the real kernels run in the other test modules, and compute-sanitizer does the race check
(scripts/gpu_check.sh sanitize).
"""

import os
import subprocess

import pytest
import torch

import compacter_kernels as ck
import emulation
from compacter_kernels import reference as ref
from counters import forward_backward_counts
from utils import CUDA_EMULATED, check_op, compacter_inputs, dense_inputs, phm_factors

pytestmark = pytest.mark.skipif(not CUDA_EMULATED, reason="runs in the emulated run: COMPACTER_KERNELS_EMULATE_CUDA=1 "
                                                          "without a GPU (scripts/test.sh does it)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,I,O,rank", [(2, 6, 10, 1), (4, 36, 20, 4), (8, 16, 24, None), (1, 40, 8, 2)])
def test_build_h_and_phm_grads_match_the_reference(dtype, n, I, O, rank):
    """cuda_build_h (H in fp32 from the factors, rounded once; a dense weight converted) and
    cuda_phm_grads (the factors' gradients from an fp32 dH) against fp64 autograd of the reference."""
    rule, left, right = phm_factors(n, I, O, rank, dtype=dtype)
    w = torch.randn(I, O, dtype=torch.float16 if dtype == torch.float32 else torch.float32)  # converted to dtype
    h, hw = torch.ops.compacter_kernels.cuda_build_h([rule, None], [left, w], [right, None], dtype)
    f64 = [None if t is None else t.double().requires_grad_() for t in (rule, left, right)]
    H64 = ref.phm_weight(*f64)
    assert h.dtype == dtype and torch.equal(hw, w.to(dtype))
    torch.testing.assert_close(h.double(), H64.to(dtype).double(), rtol=0, atol=torch.finfo(dtype).eps * 4 *
                               max(1.0, H64.abs().max().item()))
    # The same weight in dtype is read as it is: nothing built.
    (none,) = torch.ops.compacter_kernels.cuda_build_h([None], [w.to(dtype)], [None], dtype)
    assert none.numel() == 0
    dH = torch.randn(I, O)
    grads = torch.ops.compacter_kernels.cuda_phm_grads(dH, rule, left, right)
    expected = torch.autograd.grad(H64, [t for t in f64 if t is not None], dH.double())
    for g, e, t in zip([g for g, t in zip(grads, (rule, left, right)) if t is not None], expected,
                       [t for t in (rule, left, right) if t is not None]):
        assert g.dtype == t.dtype and g.shape == t.shape
        tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()))
    if right is None:
        assert grads[2].numel() == 0


def test_the_new_ops_pass_opcheck():
    rule, left, right = phm_factors(4, 32, 16, 2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.compacter_kernels.cuda_build_h.default,
                          ([rule, None], [left, torch.randn(16, 32)], [right, None], torch.bfloat16))
    torch.library.opcheck(torch.ops.compacter_kernels.cuda_phm_grads.default, (torch.randn(32, 16), rule, left, right))
    # The adapter's forward and backward (no Python op of their own: CudaAdapter calls these).
    x, hd, hu, bd, bu = torch.randn(10, 32), torch.randn(32, 16), torch.randn(16, 32), torch.randn(16), torch.randn(32)
    torch.library.opcheck(torch.ops.compacter_kernels.cuda_adapter_fwd.default,
                          (x, None, hd, bd, hu, bu, 0, 0.5, torch.float32, True))
    _, z = torch.ops.compacter_kernels.cuda_adapter_fwd(x, None, hd, bd, hu, bu, 0, 0.5, torch.float32, True)
    torch.library.opcheck(torch.ops.compacter_kernels.cuda_adapter_bwd.default,
                          (torch.randn(10, 32), x, z, hd, hu, None, hd, None, bd, None, hu, None, bu, 0, 0.5, False,
                           False))


# ---- the adapter ops' argument checks (csrc/adapter_host.h, shared with the CUDA build) ----------

def _fwd(x, h_down, h_up, residual=None, bias_down=None, bias_up=None, activation=0, out_dtype=None):
    return torch.ops.compacter_kernels.cuda_adapter_fwd(x, residual, h_down, bias_down, h_up, bias_up, activation,
                                                        1.0, x.dtype if out_dtype is None else out_dtype)


def _bwd(dy, x, z, h_down, h_up, activation=0):
    # Dense projections: their weights give the gradients' shapes and dtypes.
    return torch.ops.compacter_kernels.cuda_adapter_bwd(dy, x, z, h_down, h_up, None, h_down, None, None, None, h_up,
                                                        None, None, activation, 1.0, False, False)


M, D, K = 5, 32, 8
BAD_FWD = [  # (what, kwargs of _fwd, message)
    ("integer x", dict(x=torch.ones(M, D, dtype=torch.int32)), "x has dtype Int; the kernels take"),
    ("3-D x", dict(x=torch.randn(1, M, D)), r"x must be 2-D \(rows, d\)"),
    ("h_up shape", dict(h_up=torch.randn(K, D + 1)),
     r"cuda_adapter_fwd: h_up must have shape \[8, 32\], got \[8, 33\]"),
    ("h_down not contiguous", dict(h_down=torch.randn(K, D).t()), "cuda_adapter_fwd: h_down must be contiguous"),
    ("h dtype", dict(h_down=torch.randn(D, K, dtype=torch.float64)), "h_down and h_up must have x's dtype"),
    ("bias length", dict(bias_down=torch.randn(K + 1)), r"bias_down must have shape \(8\)"),
    ("bias dtype", dict(bias_up=torch.randn(D, dtype=torch.float64)), "bias_up must have x's dtype Float or float32"),
    ("activation", dict(activation=7), r"activation code must be in 0\.\.4"),
    ("out dtype", dict(out_dtype=torch.int64), "out_dtype: unsupported dtype Long"),
    ("residual shape", dict(residual=torch.randn(M + 1, D)), r"residual must have shape \[5, 32\], got \[6, 32\]"),
]


@pytest.mark.parametrize("what,kw,message", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_forward_rejects_bad_arguments_with_a_clear_message(what, kw, message):
    args = dict(x=torch.randn(M, D), h_down=torch.randn(D, K), h_up=torch.randn(K, D))
    _fwd(**args)  # the good call runs
    with pytest.raises(RuntimeError, match=message):
        _fwd(**{**args, **kw})


BAD_BWD = [
    ("z not contiguous", dict(z=torch.randn(K, M).t()), "cuda_adapter_bwd: z must be contiguous"),
    ("z dtype", dict(z=torch.randn(M, K, dtype=torch.float16)), "z must have x's dtype"),
    ("dy shape", dict(dy=torch.randn(M, D + 1)), r"cuda_adapter_bwd: dy must have shape \[5, 32\], got \[5, 33\]"),
    ("h_down shape", dict(h_down=torch.randn(D, K + 1)), r"h_down must have shape \[32, 8\], got \[32, 9\]"),
]


@pytest.mark.parametrize("what,kw,message", BAD_BWD, ids=[c[0] for c in BAD_BWD])
def test_backward_rejects_bad_arguments_with_a_clear_message(what, kw, message):
    args = dict(dy=torch.randn(M, D), x=torch.randn(M, D), z=torch.randn(M, K), h_down=torch.randn(D, K),
                h_up=torch.randn(K, D))
    _bwd(**args)
    with pytest.raises(RuntimeError, match=message):
        _bwd(**{**args, **kw})


def test_a_bottleneck_too_wide_for_shared_memory_says_what_to_use():
    with pytest.raises(RuntimeError, match="k=1024 needs .* bytes of shared memory .* use the triton or reference"):
        _fwd(torch.randn(M, D), torch.randn(D, 1024), torch.randn(1024, D))


# ---- which rows stay in shared memory (csrc/adapter_host.h::choose_layout) ----------------------

KNOB = "COMPACTER_KERNELS_CUDA_RESIDENT_KIB"


def _dense_adapter_checked(d, k, dtype, rows=19):
    """ck.adapter on the cuda backend against the reference, output and every gradient;
    returns (forward resident, backward resident) of the launches it made."""
    check_op(lambda *a: ck.adapter(*a, backend="cuda"), ref.adapter, dense_inputs(lead=(rows,), d=d, k=k, dtype=dtype),
             dtype, f"d={d}")
    fwd_resident, _, bwd_resident, _ = torch.ops.compacter_kernels_emulation.last_layouts()
    return bool(fwd_resident), bool(bwd_resident)


def test_resident_rows_follow_the_knob(monkeypatch):
    # d = 1024 in bf16: 32 rows of 1032 padded columns take 66,048 bytes, over the 64 KiB default.
    monkeypatch.delenv(KNOB, raising=False)
    assert _dense_adapter_checked(1024, 32, torch.bfloat16) == (False, False)
    monkeypatch.setenv(KNOB, "72")
    assert _dense_adapter_checked(1024, 32, torch.bfloat16) == (True, True)
    monkeypatch.setenv(KNOB, "0")
    assert _dense_adapter_checked(64, 16, torch.float32) == (False, False)  # resident by default


def test_a_raised_knob_streams_rows_that_do_not_fit_shared_memory(monkeypatch):
    # d = 4096 in fp32: 525 KB of rows, over the 227 KiB a block may have: streamed, no error.
    monkeypatch.setenv(KNOB, "1048576")
    assert _dense_adapter_checked(4096, 16, torch.float32, rows=5) == (False, False)


@pytest.mark.parametrize("value", ["abc", "-1", "12k", "1048577"])
def test_a_bad_knob_value_says_what_is_expected(monkeypatch, value):
    monkeypatch.setenv(KNOB, value)
    with pytest.raises(RuntimeError, match=f"{KNOB} must be a whole number of KiB from 0 to 1048576, got '{value}'"):
        _fwd(torch.randn(M, D), torch.randn(D, K), torch.randn(K, D))


def test_inference_writes_no_z():
    """store_z=False (what the entry point passes under no_grad / inference_mode): the same y, no z."""
    x, h_down, h_up = torch.randn(M, D), torch.randn(D, K), torch.randn(K, D)
    y, z = _fwd(x, h_down, h_up)
    y0, z0 = torch.ops.compacter_kernels.cuda_adapter_fwd(x, None, h_down, None, h_up, None, 0, 1.0, x.dtype, False)
    assert torch.equal(y0, y) and z0.numel() == 0 and z.shape == (M, K)
    inp = compacter_inputs(lead=(19,), d=64, k=16, n=4, rank=1, dtype=torch.float32)
    with_z = ck.compacter_adapter(*inp.args(), backend="cuda")
    with torch.inference_mode():
        assert torch.equal(ck.compacter_adapter(*inp.args(), backend="cuda"), with_z.detach())


# ---- the launch budget (tests/test_counts.py's, for the cuda backend) ----------------------------

def _counts(fn, args, leaves):
    return forward_backward_counts(fn, args, leaves, backend="cuda")


@pytest.mark.parametrize("d,k,rank,residual,shared", [(768, 24, 1, False, True), (64, 16, 4, True, False),
                                                      (96, 32, None, True, True)])
def test_compacter_runs_two_launches_forward_and_three_backward(d, k, rank, residual, shared):
    """Forward: cuda_build_h (both H's) and the row kernel; backward: the row kernel, both
    split-M products in one launch, and every parameter gradient in one; no aten compute op."""
    inp = compacter_inputs(lead=(19,), d=d, k=k, n=4, rank=rank, dtype=torch.float32, shared_rule=shared)
    r = torch.randn_like(inp.x, requires_grad=True) if residual else None
    fwd, bwd = _counts(lambda *a: ck.compacter_adapter(*a, residual=r, scale=0.5, backend="cuda"), inp.args(),
                       inp.tensors() + ([r] if residual else []))
    assert (fwd.launches["emulated"], bwd.launches["emulated"]) == (2, 3), (fwd, bwd)
    assert not fwd.aten and not bwd.aten, (fwd.aten, bwd.aten)


def test_houlsby_runs_one_launch_forward_and_three_backward_and_phm_linear_two_kernels_of_its_own():
    args = dense_inputs(lead=(19,), d=96, k=24, dtype=torch.float32)
    fwd, bwd = _counts(lambda *a: ck.adapter(*a, backend="cuda"), args, list(args))
    assert (fwd.total, bwd.total) == (1, 3), (fwd, bwd)
    # Under autocast the fp32 weights are converted by one cuda_build_h launch and kept for
    # backward (the aten ops, not counted here, are the entry point's: x cast to bf16, and
    # autograd summing x's two gradients, as the cast and as the residual).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fwd, bwd = _counts(lambda *a: ck.adapter(*a, backend="cuda"), args, list(args))
    assert (fwd.launches["emulated"], bwd.launches["emulated"]) == (2, 3), (fwd, bwd)
    # phm_linear: H built (once forward, again backward) and its gradients in one launch each;
    # the GEMMs and the bias sum are cuBLAS's (aten).
    x = torch.randn(19, 64, requires_grad=True)
    factors = phm_factors(4, 64, 32, 1, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    fwd, bwd = _counts(lambda *a: ck.phm_linear(*a, backend="cuda"), (x, *factors, bias), [x, *factors, bias])
    assert (fwd.launches["emulated"], dict(fwd.aten)) == (1, {"addmm": 1}), fwd
    assert (bwd.launches["emulated"], dict(bwd.aten)) == (2, {"mm": 2, "sum": 1}), bwd


def test_the_cuda_launch_counter_sees_an_extra_launch(monkeypatch):
    from compacter_kernels.ops.cuda import adapter as cuda_adapter

    build_h = cuda_adapter.build_h

    def twice(*a):
        build_h(*a)
        return build_h(*a)

    monkeypatch.setattr(cuda_adapter, "build_h", twice)
    inp = compacter_inputs(lead=(19,), d=64, k=16, n=4, rank=1, dtype=torch.float32)
    fwd, _ = _counts(lambda *a: ck.compacter_adapter(*a, backend="cuda"), inp.args(), inp.tensors())
    assert fwd.launches["emulated"] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_gradients_are_bit_identical_run_to_run(dtype):
    inp = compacter_inputs(lead=(300,), d=96, k=24, n=4, rank=2, dtype=dtype, shared_rule=True)
    fn = lambda: ck.compacter_adapter(*inp.args(), scale=0.5, backend="cuda")  # noqa: E731
    dy = torch.randn(300, 96).to(dtype)
    first = torch.autograd.grad(fn(), inp.tensors(), dy)
    again = torch.autograd.grad(fn(), inp.tensors(), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---- shared-memory races: the kernels under ThreadSanitizer --------------------------------------

def test_kernels_have_no_shared_memory_races_under_thread_sanitizer():
    """race_check.cpp runs the forward and backward kernels at shapes that take each of their
    paths, built with -fsanitize=thread: a block's threads meet only at __syncthreads, so a
    missing barrier is a reported data race (checked: removing the one before the forward's
    y epilogue is reported at its line)."""
    exe = emulation.race_check_executable()
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66",
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [torch_lib, os.environ.get("LD_LIBRARY_PATH")]))}
    run = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.stdout.strip().endswith("ok"), run.stdout
