"""The ops together, on every backend this machine runs: two threads running every op at once
give the sequential results; a module of two ops compiles whole (torch.compile(fullgraph=True)).
What is checked of each op alone is in its own file (tests/test_<op>.py)."""

import threading

import pytest
import torch

import compacter_kernels as ck
from op_checks import DEVICE, OPS, backend, op_inputs, poison_outputs  # noqa: F401
from utils import ON_GPU


def test_two_threads_give_the_sequential_results(backend):
    calls = []
    for op in OPS:
        make, args = op_inputs(op)
        calls.append((make(backend), args))

    def run(fn, args):
        y = fn(*args)
        leaves = [t for t in args if t is not None]
        return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))

    expected = [run(fn, args) for fn, args in calls]
    results, errors = {}, []

    def worker(w):
        try:
            for rep in range(2):
                for i, (fn, args) in enumerate(calls):
                    results[(w, rep, i)] = run(fn, args)
        except Exception as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (w, rep, i), got in results.items():
        for a, b in zip(got, expected[i]):
            assert torch.equal(a, b), f"thread {w}, repeat {rep}, op {OPS[i]}"


def test_torch_compile_fullgraph_of_a_module():
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    model = torch.nn.Sequential(
        ck.nn.CompacterAdapter(32, bottleneck=16, phm_dim=4, backend="triton"),
        ck.nn.PHMLinear(32, 16, phm_dim=4, backend="triton"),
    ).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    y_eager = model(x)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    g = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *model.parameters()])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
