"""pytest-benchmark over the op cases of compacter-bench: compacter, houlsby and phm_linear,
fwd / bwd / fwd+bwd, per provider. Inputs, providers and the (setup, run) split come from
compacter_kernels.bench, so this times exactly what the command times."""

import functools

import pytest
import torch

from compacter_kernels.bench import cases, counts, timing

GPU = torch.cuda.is_available()
SHAPES = (cases.Shape("t5-base", 768, 24), cases.Shape("llm-4096", 4096, 128)) if GPU else \
    (cases.Shape("t5-base", 768, 24),)
MS = (1024, 16384) if GPU else (256,)
DTYPE = torch.bfloat16 if GPU else torch.float32
ROUNDS, WARMUP = (50, 5) if GPU else (10, 2)


@functools.lru_cache(maxsize=None)
def _fn(op, provider):
    # One compiled function per op for the whole module (dynamic=True: no recompile per M).
    return cases.provider_fn(op, provider, "gelu")


@pytest.mark.parametrize("provider", [p for p in cases.PROVIDERS if p != "floor"])
@pytest.mark.parametrize("mode", counts.MODES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.model}-d{s.d}-k{s.k}")
@pytest.mark.parametrize("op", counts.OPS)
def test_op(benchmark, device, op, shape, M, mode, provider):
    reason = cases.skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
    case = cases.Case(op, M, shape.d, shape.k, dtype=DTYPE, model=shape.model)
    setup, run = cases.runner(_fn(op, provider), mode,
                              cases.make_inputs(case, device, cases.input_copies(case, device)))
    try:
        run(setup())  # also the first warm-up round: compiles, autotunes
    except NotImplementedError as exc:
        pytest.skip(str(exc))

    def synced_setup():  # untimed: the GPU is idle when the timed call starts
        state = setup()
        timing.sync(device)
        return (state,), {}

    def synced_run(state):
        run(state)
        timing.sync(device)

    e = torch.finfo(DTYPE).bits // 8
    benchmark.group = f"{op} {mode} {shape.model} d={shape.d} k={shape.k} M={M}"
    benchmark.extra_info.update(op=op, mode=mode, provider=provider, M=M, d=shape.d, k=shape.k,
                                dtype=str(DTYPE), floor_bytes=counts.floor_bytes(op, mode, M, shape.d, shape.k, e),
                                flops=counts.flops(op, mode, M, shape.d, shape.k))
    benchmark.pedantic(synced_run, setup=synced_setup, rounds=ROUNDS, warmup_rounds=WARMUP)
