"""Hardening: random valid configurations on every available backend, random invalid ones,
NaN/inf propagation, and distributed data parallel with a shared rule."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compacter_kernels as ck
from compacter_kernels import reference as ref
import emulation
from utils import (CUDA_EMULATED, ON_GPU, assert_matches_reference, compacter_inputs, double_leaves, phm_factors,
                   why_backend_cannot_run)

# Bounded for CI; `HYPOTHESIS_PROFILE=gpu` explores more on a GPU machine.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _usable_backends():
    kernels = [name for name in ("triton", "cuda") if why_backend_cannot_run(name) is None]
    # The emulated run tests the cuda backend only; the main run has the reference.
    return kernels if CUDA_EMULATED else ["reference", *kernels]


@st.composite
def adapter_configs(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    return dict(
        n=n,
        d=n * draw(st.integers(1, 6)),
        k=n * draw(st.integers(1, 4)),
        rank=draw(st.sampled_from([None, 1, 2, 4])),
        lead=tuple(draw(st.lists(st.integers(0, 5), max_size=2))),
        activation=draw(st.sampled_from(ref.ACTIVATIONS)),
        bias=draw(st.booleans()),
        shared=draw(st.booleans()),
        residual=draw(st.booleans()),
        scale=draw(st.floats(-2, 2, allow_nan=False)),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
    )


def _build(cfg, dtype, device):
    x = torch.randn(*cfg["lead"], cfg["d"], dtype=dtype, device=device)
    down = phm_factors(cfg["n"], cfg["d"], cfg["k"], cfg["rank"], dtype=dtype, device=device)
    up = phm_factors(cfg["n"], cfg["k"], cfg["d"], cfg["rank"], dtype=dtype, device=device)
    if cfg["shared"]:
        up[0] = down[0]
    bd = torch.randn(cfg["k"], dtype=dtype, device=device) if cfg["bias"] else None
    bu = torch.randn(cfg["d"], dtype=dtype, device=device) if cfg["bias"] else None
    residual = torch.randn_like(x) if cfg["residual"] else None
    return [x, *down, bd, *up, bu], residual


@given(cfg=adapter_configs())
def test_random_valid_configurations_match_the_reference_on_every_backend(cfg):
    """Output and every gradient against the fp64 reference; in fp16/bf16 within twice the error
    of the reference run in that dtype (tests/utils.py::assert_matches_reference)."""
    dtype = cfg["dtype"]
    args, residual = _build(cfg, dtype, DEVICE)
    leaves = list({id(t): t.requires_grad_() for t in args + [residual] if t is not None}.values())
    kw = dict(activation=cfg["activation"], scale=cfg["scale"], residual=residual)
    memo = {}
    args64 = double_leaves(args, memo)
    (res64,) = double_leaves([residual], memo)
    y64 = ref.compacter_adapter(*args64, **{**kw, "residual": res64})
    y_lp = ref.compacter_adapter(*args, **kw)
    dy = torch.randn(y64.shape, dtype=dtype, device=DEVICE)
    g64 = g_lp = None
    if y64.numel():
        g64 = torch.autograd.grad(y64, double_leaves(leaves, memo), dy.double(), allow_unused=True)
        g_lp = torch.autograd.grad(y_lp, leaves, dy, allow_unused=True)
    for backend in _usable_backends():
        if dtype == torch.bfloat16 and backend == "triton" and not ON_GPU:
            continue  # bf16 tl.dot is wrong in Triton's interpreter: bf16 triton runs on a GPU
        what = f"{backend} {cfg}"
        y = ck.compacter_adapter(*args, **kw, backend=backend)
        assert_matches_reference(y, y64, y_lp, dtype, f"{what} output")
        if g64 is None:
            continue
        g = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        for i, (a, b, c) in enumerate(zip(g, g64, g_lp)):
            assert (a is None) == (b is None), f"{what} grad #{i}"
            if a is not None:
                assert_matches_reference(a, b, c, dtype, f"{what} grad #{i} {tuple(a.shape)}")


MUTATIONS = ["rule_shape", "left_rows", "inner_shape", "bias_len", "dtype", "indivisible", "activation", "scale"]


@given(cfg=adapter_configs(), mutation=st.sampled_from(MUTATIONS), backend=st.sampled_from(["auto", "reference"]))
def test_random_invalid_configurations_raise_clear_errors(cfg, mutation, backend):
    args, residual = _build({**cfg, "bias": True}, torch.float32, "cpu")
    x, rd, ld, rgd, bd, ru, lu, rgu, bu = args
    kw = dict(activation=cfg["activation"], scale=cfg["scale"], residual=residual, backend=backend)
    n = cfg["n"]
    if mutation == "rule_shape":
        rd = torch.randn(n, n, n + 1)
    elif mutation == "left_rows":
        ld = torch.randn(n, cfg["d"] // n + 1, ld.shape[2])
    elif mutation == "inner_shape":
        if rgd is None:  # unfactorised: the down projection's width no longer matches the rest
            ld = torch.randn(n, cfg["d"] // n, cfg["k"] // n + 1)
        else:
            rgd = torch.randn(n, rgd.shape[1] + 1, rgd.shape[2])
    elif mutation == "bias_len":
        bu = torch.randn(cfg["d"] + 1)
    elif mutation == "dtype":
        lu = lu.double()
    elif mutation == "indivisible":
        x = torch.randn(3, cfg["d"] + 1)
    elif mutation == "activation":
        kw["activation"] = "softmax"
    elif mutation == "scale":
        kw["scale"] = "1.0"
    with pytest.raises((ValueError, TypeError)):
        ck.compacter_adapter(x, rd, ld, rgd, bd, ru, lu, rgu, bu, **kw)


@pytest.mark.parametrize("backend", _usable_backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_in_the_reference(backend, bad):
    args, _ = _build(dict(n=4, d=32, k=16, rank=1, lead=(6,), bias=True, shared=True, residual=False,
                          activation="gelu", scale=1.0), torch.float32, DEVICE)
    args[0][2, 5] = bad
    y = ck.compacter_adapter(*args, backend=backend)
    y_ref = ref.compacter_adapter(*args)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    finite = torch.isfinite(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], atol=3e-4, rtol=1e-3)


# ---- distributed data parallel over 2 CPU processes (gloo), shared rule included -----------------

class _Stack(torch.nn.Module):
    """Two adapters sharing one rule that is registered once, here."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.phm_rule = ck.nn.PHMRule(4)
        self.blocks = torch.nn.ModuleList(
            ck.nn.CompacterAdapter(32, bottleneck=8, rule=self.phm_rule, backend=backend) for _ in range(2))
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


ROWS_PER_RANK, WORLD = 5, 2


def _batch():
    return torch.randn(WORLD * ROWS_PER_RANK, 32, generator=torch.Generator().manual_seed(1))


def _exit_cleanly():
    """A worker that finished its work exits at once: at interpreter teardown a gloo thread still
    joinable can abort the process ("terminate called without an active exception", SIGABRT;
    seen under load here and in pytorch/pytorch#90549), failing a run whose results were written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_worker(rank, backend, init_file, out_file):
    if CUDA_EMULATED:  # a fresh process: conftest did not run here
        emulation.enable()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _Stack(backend)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(_batch()[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out_file)
        dist.barrier()  # no rank tears gloo down while another still works
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.mark.parametrize("backend", _usable_backends())
def test_ddp_gloo_gradients_equal_the_single_process_run(backend, tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out_file = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(backend, str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out_file)
    model = _Stack(backend)
    model(_batch()).backward()  # the mean over all rows = the mean of the ranks' means
    assert set(ddp_grads) == {n for n, _ in model.named_parameters()}
    assert "phm_rule.phm_rule" in ddp_grads
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def _fsdp_worker(rank, backend, init_file, out_file):
    if CUDA_EMULATED:
        emulation.enable()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank and in the single-process run
        model = _Stack(backend)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:  # adapters sharded one by one, then the rest (the shared rule)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss = model(_batch()[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK])
        loss.backward()
        dist.all_reduce(mean := loss.detach().clone())
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # every rank joins the gather
        if rank == 0:
            torch.save({"loss": mean / WORLD, "grads": grads}, out_file)
        dist.barrier()  # no rank tears gloo down while another is still in a collective (a SIGABRT seen in CI)
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.mark.parametrize("backend", _usable_backends())
def test_fsdp2_gloo_loss_and_gradients_equal_the_single_process_run(backend, tmp_path):
    """FSDP2 (fully_shard) over gloo in two CPU processes, a shared rule across the adapters:
    the loss and every gradient of the single-process run."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out_file = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(backend, str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    sharded = torch.load(out_file)
    torch.manual_seed(0)
    model = _Stack(backend)
    loss = model(_batch())
    loss.backward()
    torch.testing.assert_close(sharded["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
    assert set(sharded["grads"]) == {n for n, _ in model.named_parameters()} and "phm_rule.phm_rule" in sharded["grads"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---- GPU only: CUDA graphs, and offsets beyond int32 ---------------------------------------------

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in _usable_backends()] if DEVICE == "cuda" else []


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay_of_forward_and_backward(backend):
    layer = ck.nn.CompacterAdapter(256, bottleneck=24, backend=backend).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    params = [x, *layer.parameters()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles kernels) outside the capture
        for _ in range(2):
            torch.autograd.grad(layer(x).square().sum(), params)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), params)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y_eager = layer(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), params)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with ~16 GB free")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_to_the_31_elements(backend):
    d, k = 1024, 32
    M = 2**31 // d + 3  # the last rows sit past int32 element offsets
    inp = compacter_inputs(lead=(M,), d=d, k=k, n=4, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    y = ck.compacter_adapter(*inp.args(), backend=backend)
    tail = slice(M - 5, M)
    y_tail = ref.compacter_adapter(inp.x[tail].float(), *[t if t is None else t.float() for t in inp.args()[1:]])
    torch.testing.assert_close(y[tail].float(), y_tail, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", [b for b in _usable_backends() if b != "reference"])
def test_fp16_bottleneck_overflow_behaves_as_the_reference(backend):
    """Row 3's bottleneck pre-activation exceeds fp16's range: the reference rounds it to +-inf
    (gelu(-inf) is nan); a kernel that kept it in fp32 would silently return finite numbers."""
    args, _ = _build(dict(n=4, d=32, k=16, rank=1, lead=(8,), bias=True, shared=True, residual=False,
                          activation="gelu", scale=0.5), torch.float16, DEVICE)
    H = ref.phm_weight(*(t.detach().float() for t in args[1:4])) * 30
    with torch.no_grad():
        args[2].mul_(30)
        # Row 3 scaled so that its most negative pre-activation is 2-4x fp16's range (-inf in fp16,
        # and gelu(-inf) is nan; kept in fp32 it would give gelu = -0), with no element within 3% of
        # the overflow threshold (65520), where summation order would decide inf or finite.
        z3 = args[0][3].float() @ H
        f = next(f for f in (p * 65504 / -z3.min() for p in (2.0, 2.4, 2.9, 3.5))
                 if ((f * z3.abs() / 65520 - 1).abs() > 0.03).all())
        args[0][3] *= f
    z = args[0].float() @ H
    assert z[3].min() < -65504 and torch.isfinite(args[0]).all() and z[[0, 1, 2]].abs().max() < 65504
    y = ck.compacter_adapter(*args, backend=backend)
    y_ref = ref.compacter_adapter(*args)
    assert not torch.isfinite(y_ref[3]).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref))
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


@pytest.mark.skipif(DEVICE != "cuda", reason="the FSDP smoke test runs on one GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fsdp_fully_shard_on_one_gpu(backend, tmp_path):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        plain = _Stack(backend).cuda()
        sharded = fully_shard(_Stack(backend).cuda())
        x = _batch().cuda()
        plain(x).backward()
        loss = sharded(x)
        loss.backward()
        torch.optim.SGD(sharded.parameters(), lr=0.1).step()
        torch.testing.assert_close(loss, plain(x))
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
            g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            torch.testing.assert_close(g, p.grad, msg=name)
    finally:
        dist.destroy_process_group()
