"""Hardening of the layers in a training set-up: distributed data parallel (DDP, FSDP2) with a
shared rule, CUDA graphs. (What hardens one op, random valid and invalid configurations, NaN/inf,
fp16 overflow, >2^31 elements, is in that op's file: tests/test_compacter_adapter.py.)"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import compacter_kernels as ck
import emulation
from utils import CUDA_EMULATED, why_backend_cannot_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _usable_backends():
    kernels = [name for name in ("triton", "cuda") if why_backend_cannot_run(name) is None]
    # The emulated run tests the cuda backend only; the main run has the reference.
    return kernels if CUDA_EMULATED else ["reference", *kernels]


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


# ---- GPU only: CUDA graphs, FSDP on one GPU ---------------------------------------------

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
