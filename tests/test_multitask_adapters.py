"""The mixed-task ops, ck.multitask_compacter_adapter / ck.multitask_adapter (row i through task
task_ids[i]'s adapter), and the banks, against the naive definition (one single-task call per
row, in fp64), every gradient, on every backend this machine runs; the generic checks of
tests/op_checks.py that apply to them (a bottleneck wider than the kernels), their custom op
under opcheck; the errors for bad task ids and stacked parameters; the banks built from
single-task adapters and split back."""

import pytest
import torch

import compacter_kernels as ck
import op_checks
from op_checks import narrow_column_chunks  # noqa: F401
from compacter_kernels import nn as cknn
from utils import check_op, dense_inputs, why_backend_cannot_run

BACKENDS = [b for b in ("reference", "triton", "cuda") if why_backend_cannot_run(b) is None]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _factors(T, n, i, o, rank, dtype, per_task_rule):
    g = lambda *s: torch.randn(*s, dtype=torch.float64).to(device=DEVICE, dtype=dtype)  # noqa: E731
    rule = g(*((T,) if per_task_rule else ()), n, n, n)
    if rank is None:
        return rule, g(T, n, i // n, o // n) * 0.5, None
    return rule, g(T, n, i // n, rank) * 0.5, g(T, n, rank, o // n) * 0.5


def _compacter_args(T, d=32, k=16, n=4, rank=1, dtype=torch.float64, per_task_rule=False, shared=True, bias=True):
    rd, ld, rgd = _factors(T, n, d, k, rank, dtype, per_task_rule)
    ru, lu, rgu = _factors(T, n, k, d, rank, dtype, per_task_rule)
    if shared:
        ru = rd
    b = lambda o: torch.randn(T, o, dtype=torch.float64).to(device=DEVICE, dtype=dtype) if bias else None  # noqa
    args = [rd, ld, rgd, b(k), ru, lu, rgu, b(d)]
    leaves = {id(t): t.requires_grad_() for t in args if t is not None}
    return [None if t is None else leaves[id(t)] for t in args]


def _per_row(x, ids, params, task_slices, single, **kw):
    """The definition: each row through its own task's single-task op (fp64, no grouping)."""
    d = x.shape[-1]
    ids2 = ids.expand(x.shape[:-1]).reshape(-1)
    x2 = x.reshape(ids2.shape[0], d)  # d may be 0
    r = kw.pop("residual", None)
    r2 = None if r is None else r.reshape(ids2.shape[0], d)
    rows = [single(x2[i:i + 1], *task_slices(params, int(t)), **kw,
                   residual=None if r2 is None else r2[i:i + 1]) for i, t in enumerate(ids2.tolist())]
    return torch.cat(rows).reshape(x.shape)


def _compacter_slices(p, t):
    rd, ld, rgd, bd, ru, lu, rgu, bu = p
    s = lambda v, rule=False: None if v is None else (v[t] if not rule or v.dim() == 4 else v)  # noqa: E731
    return s(rd, True), s(ld), s(rgd), s(bd), s(ru, True), s(lu), s(rgu), s(bu)


def _dense_slices(p, t):
    return tuple(None if v is None else v[t] for v in p)


def _ids(kind, T, lead, device=DEVICE):
    g = torch.Generator().manual_seed(1)
    if kind == "per_token":  # unsorted, task 1 left empty when T > 2
        ids = torch.randint(0, T, lead, generator=g)
        if T > 2:
            ids[ids == 1] = 0
    elif kind == "one_task":
        ids = torch.full(lead, T - 1)
    else:  # per sequence: (batch, 1)
        ids = torch.randint(0, T, (lead[0], 1), generator=g)
    return ids.to(device)


CASES = [  # (T, ids, rank, per-task rule, shared rule, residual)
    (4, "per_token", 1, False, True, False), (3, "per_sequence", 2, True, False, True),
    (1, "per_token", None, False, True, False), (5, "one_task", 1, False, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,kind,rank,per_task_rule,shared,residual", CASES)
def test_multitask_compacter_matches_one_call_per_row(backend, T, kind, rank, per_task_rule, shared, residual):
    dtype = torch.float64 if backend == "reference" else torch.float32
    lead = (3, 7)
    params = _compacter_args(T, rank=rank, dtype=dtype, per_task_rule=per_task_rule, shared=shared)
    x = torch.randn(*lead, 32, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    ids = _ids(kind, T, lead)

    def fused(x, *p):
        return ck.multitask_compacter_adapter(x, ids, *p[:8], activation="silu", scale=0.5,
                                              residual=p[8] if residual else None, backend=backend)

    def naive(x, *p):
        return _per_row(x, ids, p[:8], _compacter_slices, ck.reference.compacter_adapter, activation="silu",
                        scale=0.5, residual=p[8] if residual else None)

    check_op(fused, naive, (x, *params, *([r] if residual else [])), dtype, f"multitask {backend} T={T} {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multitask_adapter_matches_one_call_per_row(backend, dtype):
    if backend == "reference":
        dtype = torch.float64
    T, d, k = 3, 24, 8
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * 0.3).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    params = (g(T, d, k), g(T, k), g(T, k, d), g(T, d))
    x = g(19, d)
    ids = _ids("per_token", T, (19,))

    def fused(x, *p):
        return ck.multitask_adapter(x, ids, *p, activation="relu", backend=backend)

    def naive(x, *p):
        return _per_row(x, ids, p, _dense_slices, ck.reference.adapter, activation="relu", scale=1.0)

    check_op(fused, naive, (x, *params), dtype, f"multitask adapter {backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_arguments_and_no_rows(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    T = 3
    params = _compacter_args(T, dtype=dtype, shared=False)
    strided = [None if p is None else p.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
               for p in params]
    x = torch.randn(32, 13, dtype=dtype, device=DEVICE).t().requires_grad_()  # (13, 32), row stride 1
    ids = torch.arange(26, device=DEVICE).flip(0).remainder(T)[::2]  # strided, unsorted
    got = ck.multitask_compacter_adapter(x, ids, *strided, backend=backend)
    want = ck.multitask_compacter_adapter(x.detach().contiguous(), ids, *params, backend="reference")
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    empty = ck.multitask_compacter_adapter(x[:0], ids[:0], *params, backend=backend)
    assert empty.shape == (0, 32)


BAD_IDS = [
    ("float ids", lambda ids: ids.float(), TypeError, "task_ids must be an integer tensor"),
    ("bool ids", lambda ids: ids > 0, TypeError, "task_ids must be an integer tensor"),
    ("not a tensor", lambda ids: ids.tolist(), TypeError, "task_ids must be an integer torch.Tensor"),
    ("negative", lambda ids: ids - 1, ValueError, r"task_ids must be in \[0, 3\).*from -1"),
    ("too large", lambda ids: ids + 1, ValueError, r"task_ids must be in \[0, 3\).*to 3"),
    ("shape", lambda ids: ids[:4], ValueError, r"task_ids of shape \(4,\) must broadcast to x.shape\[:-1\]"),
]


@pytest.mark.parametrize("what,bad,error,message", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_task_ids_are_named(what, bad, error, message):
    params = _compacter_args(3)
    x = torch.randn(9, 32, dtype=torch.float64, device=DEVICE)
    ids = torch.arange(9, device=DEVICE) % 3
    ck.multitask_compacter_adapter(x, ids, *params)  # the good call runs
    with pytest.raises(error, match=message):
        ck.multitask_compacter_adapter(x, bad(ids), *params)
    w = [torch.randn(3, 32, 8, dtype=torch.float64, device=DEVICE), None,
         torch.randn(3, 8, 32, dtype=torch.float64, device=DEVICE), None]
    with pytest.raises(error, match=message):
        ck.multitask_adapter(x, bad(ids), *w)


def test_bad_stacked_parameters_are_named():
    x = torch.randn(9, 32, dtype=torch.float64)
    ids = torch.arange(9) % 3
    rd, ld, rgd, bd, ru, lu, rgu, bu = _compacter_args(3, shared=False)
    with pytest.raises(ValueError, match=r"bias_up must have the task dimension first, \(3, \.\.\.\)"):
        ck.multitask_compacter_adapter(x, ids, rd, ld, rgd, bd, ru, lu, rgu, bu[:2])
    with pytest.raises(ValueError, match=r"left_down must be 4-D"):
        ck.multitask_compacter_adapter(x, ids, rd, ld[0], rgd, bd, ru, lu, rgu, bu)
    with pytest.raises(ValueError, match=r"rule_up must be \(n, n, n\), shared by the tasks, or \(T, n, n, n\)"):
        ck.multitask_compacter_adapter(x, ids, rd, ld, rgd, bd, ru[None, None], lu, rgu, bu)
    with pytest.raises(ValueError, match=r"per task .*x has 31 features"):
        ck.multitask_compacter_adapter(x[:, :31], ids, rd, ld, rgd, bd, ru, lu, rgu, bu)
    with pytest.raises(ValueError, match=r"w_up must have the task dimension first"):
        ck.multitask_adapter(x, ids, torch.randn(3, 32, 8, dtype=torch.float64), None,
                             torch.randn(2, 8, 32, dtype=torch.float64), None)


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("shared_rule", [False, True])
def test_compacter_bank_runs_each_row_through_its_tasks_adapter_and_splits_back(factorized, shared_rule):
    torch.manual_seed(0)
    rule = cknn.PHMRule(4) if shared_rule else None
    adapters = [cknn.CompacterAdapter(32, bottleneck=8, rule=rule, factorized=factorized, activation="relu")
                for _ in range(3)]
    for a in adapters:  # non-trivial weights: the fresh ones are near the identity
        for p in a.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    if rule is not None:
        torch.nn.init.normal_(rule.phm_rule, 0.0, 0.3)
    bank = cknn.CompacterAdapterBank.from_adapters(adapters)
    assert (bank.shared_rule is rule) if shared_rule else bank.phm_rule.shape == (3, 4, 4, 4)
    x = torch.randn(2, 5, 32)
    ids = torch.tensor([[2], [0]])  # per sequence
    y = bank(x, ids)
    for b, t in enumerate((2, 0)):
        torch.testing.assert_close(y[b], adapters[t](x[b]))
    for a, back in zip(adapters, bank.to_adapters()):
        torch.testing.assert_close(back(x), a(x))
    y.square().sum().backward()  # gradients reach the stacked parameters
    assert all(p.grad is not None for p in bank.parameters())


def test_houlsby_bank_and_a_fresh_bank():
    torch.manual_seed(0)
    adapters = [cknn.HoulsbyAdapter(16, 4) for _ in range(2)]
    for a in adapters:
        for p in a.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    bank = cknn.HoulsbyAdapterBank.from_adapters(adapters)
    x = torch.randn(6, 16)
    ids = torch.tensor([1, 0, 1, 1, 0, 0])
    y = bank(x, ids)
    for i, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[i], adapters[t](x[i:i + 1])[0])
    assert [a.w_down.shape for a in bank.to_adapters()] == [(16, 4)] * 2
    fresh = cknn.CompacterAdapterBank(4, 128)  # reduction factor 32: k = 4
    assert fresh.down_W_left.shape == (4, 4, 32, 1) and fresh.phm_rule.shape == (4, 4, 4)
    assert fresh(torch.randn(3, 128), torch.tensor([0, 3, 1])).shape == (3, 128)


def test_bank_arguments_are_checked():
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        cknn.CompacterAdapterBank(0, 32, bottleneck=8)
    with pytest.raises(TypeError, match="from_adapters takes a non-empty sequence"):
        cknn.CompacterAdapterBank.from_adapters([])
    with pytest.raises(ValueError, match="the adapters differ"):
        cknn.CompacterAdapterBank.from_adapters([cknn.CompacterAdapter(32, bottleneck=8),
                                                 cknn.CompacterAdapter(32, bottleneck=16)])
    with pytest.raises(ValueError, match="the adapters differ"):
        cknn.HoulsbyAdapterBank.from_adapters([cknn.HoulsbyAdapter(16, 4), cknn.HoulsbyAdapter(16, 8)])


@pytest.mark.parametrize("backend", op_checks.usable_backends())
@pytest.mark.parametrize("op", ["compacter", "adapter"])
def test_a_bottleneck_wider_than_the_kernels_runs_as_matmuls(backend, op, monkeypatch):
    monkeypatch.setattr(op_checks.launch, "POISON", True)
    op_checks.check_wide_bottleneck(backend, op, tasks=3)


def test_opcheck_triton_ops(monkeypatch):
    """The triton forward op under the Function (its schema, fake impl, no aliasing) on stacked
    per-task weights with task ids. Its autograd is the Function's, so the inputs need no gradient."""
    if not ck.available_backends()["triton"]:
        pytest.skip(ck.available_backends()["triton"].reason)
    monkeypatch.setattr(op_checks.launch, "POISON", True)
    fwd = torch.ops.compacter_kernels.triton_adapter_fwd.default
    x, wd, bd, wu, bu = dense_inputs(lead=(5,), d=32, k=16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    ids = torch.tensor([1, 0, 1, 1, 0], device=DEVICE)
    stacked = (None, torch.stack([wd, wd.flip(0)]), None, torch.stack([bd, bd]), None, torch.stack([wu, wu]), None,
               torch.stack([bu, bu]))
    torch.library.opcheck(fwd, (x, None, *stacked, ids, "silu", 1.0, torch.float32, True))


# ---- every task in one launch per kernel (triton): the forward alone, and with autograd ------------

triton_only = pytest.mark.skipif(why_backend_cannot_run("triton") is not None,
                                 reason=str(why_backend_cannot_run("triton")))

GROUPED = [  # (T, ids, rank, per-task rule, residual, M)
    (4, "per_token", 1, False, False, 37), (3, "per_sequence", 4, True, True, 40), (1, "per_token", None, False, True, 5),
    (64, "per_token", 1, True, False, 301), (5, "one_task", 2, False, False, 33),
]


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,kind,rank,per_task_rule,residual,M", GROUPED)
def test_grouped_forward_matches_the_per_task_loop(dtype, T, kind, rank, per_task_rule, residual, M):
    """H built in the kernel (rank 1, unfactorized) and prebuilt per task (rank 2 and 4)."""
    lead = (M // 5, 5) if kind == "per_sequence" else (M,)
    params = _compacter_args(T, rank=rank, dtype=dtype, per_task_rule=per_task_rule, shared=not per_task_rule)
    x = torch.randn(*lead, 32, device=DEVICE).to(dtype)
    r = torch.randn_like(x) if residual else None
    ids = _ids(kind, T, lead)
    with torch.no_grad():
        y = ck.multitask_compacter_adapter(x, ids, *params, activation="gelu_tanh", scale=0.5, residual=r,
                                           backend="triton")
    p64 = [None if p is None else p.detach().double() for p in params]
    want = _per_row(x.double(), ids, p64, _compacter_slices, ck.reference.compacter_adapter, activation="gelu_tanh",
                    scale=0.5, residual=None if r is None else r.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@triton_only
def test_grouped_forward_is_one_launch_and_writes_no_z():
    from compacter_kernels.ops.triton import launch
    from counters import counting, traffic

    T, M = 6, 50
    params = _compacter_args(T, dtype=torch.float32)
    x = torch.randn(M, 32, device=DEVICE)
    ids = torch.randint(0, T, (M,), device=DEVICE)
    with torch.inference_mode(), counting() as counts:
        ck.multitask_compacter_adapter(x, ids, *params, backend="triton")
    assert dict(counts.launches) == {"_group_rows_kernel": 1, "_adapter_fwd_kernel": 1}
    # torch ops: only the range check of task_ids (one read back).
    assert set(counts.aten) <= {"aminmax", "stack", "_local_scalar_dense"}, counts.aten
    if launch.interpreting():
        with torch.no_grad(), traffic() as moved:
            y = ck.multitask_compacter_adapter(x, ids, *params, backend="triton")
        assert moved.of(y) == (0, 1) and moved.of(x) == (2, 0)  # y written once; no z at all
    # Training: the same one launch forward (z written), and the single-task backward's three.
    from counters import forward_backward_counts

    leaves = {id(p): p.detach().requires_grad_() for p in params if p is not None}
    trained = [None if p is None else leaves[id(p)] for p in params]
    fwd, bwd = forward_backward_counts(lambda x: ck.multitask_compacter_adapter(x, ids, *trained, backend="triton"),
                                       (x.requires_grad_(),), [x, *leaves.values()])
    assert dict(fwd.launches) == {"_group_rows_kernel": 1, "_adapter_fwd_kernel": 1}
    assert dict(bwd.launches) == {"_adapter_rows_kernel": 1, "_adapter_cols_kernel": 1, "_factor_grads_kernel": 1}
    assert not bwd.aten, bwd.aten


@triton_only
def test_grouped_dense_forward_under_autocast_like_the_loop():
    T, d, k = 3, 24, 8
    w = [torch.randn(T, d, k, device=DEVICE) * 0.3, torch.randn(T, k, device=DEVICE),
         torch.randn(T, k, d, device=DEVICE) * 0.3, torch.randn(T, d, device=DEVICE)]
    x = torch.randn(13, d, device=DEVICE)
    ids = torch.randint(0, T, (13,), device=DEVICE)
    amp = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    with torch.no_grad(), torch.autocast(DEVICE, dtype=amp):
        fused = ck.multitask_adapter(x, ids, *w, backend="triton")
        loop = ck.multitask_adapter(x, ids, *w, backend="reference")
    assert fused.dtype == loop.dtype == torch.float32
    torch.testing.assert_close(fused, loop, rtol=2e-2, atol=2e-2)


@triton_only
@pytest.mark.parametrize("shared", [True, False])
def test_grouped_gradients_are_bit_identical_and_differentiable_twice(shared):
    T = 4
    params = _compacter_args(T, dtype=torch.float32, shared=shared, per_task_rule=not shared)
    leaves = list({id(p): p for p in params if p is not None}.values())
    x = torch.randn(90, 32, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, T, (90,), device=DEVICE)
    fn = lambda: ck.multitask_compacter_adapter(x, ids, *params, scale=0.5, backend="triton")  # noqa: E731
    dy = torch.randn(90, 32, device=DEVICE)
    first = torch.autograd.grad(fn(), [x, *leaves], dy)
    again = torch.autograd.grad(fn(), [x, *leaves], dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # create_graph=True: a gradient penalty on dx, against the reference's
    def penalty(backend):
        y = ck.multitask_compacter_adapter(x, ids, *params, scale=0.5, backend=backend)
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), leaves, allow_unused=True, materialize_grads=True)
    for a, b in zip(penalty("triton"), penalty("reference")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


@triton_only
def test_grouped_prebuilt_h_is_one_launch_for_every_task():
    """Past the in-kernel budget (rank 4 here) every task's H of both projections comes from one
    build_h launch, which also groups the rows: two launches in all."""
    from counters import counting

    params = _compacter_args(5, rank=4, dtype=torch.float32, per_task_rule=True, shared=False)
    x = torch.randn(40, 32, device=DEVICE)
    ids = torch.randint(0, 5, (40,), device=DEVICE)
    with torch.no_grad(), counting() as counts:
        y = ck.multitask_compacter_adapter(x, ids, *params, backend="triton")
    assert dict(counts.launches) == {"_build_h_kernel": 1, "_adapter_fwd_kernel": 1}
    want = ck.multitask_compacter_adapter(x, ids, *params, backend="reference")
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


# ---- what an adversarial round found: absent tasks, id dtypes, empty widths, second derivatives,
# torch.compile, forward-mode AD, reads back to the host ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("present", [[0], [2], [1, 2], [0, 2]])
def test_any_task_may_be_absent_in_training(backend, present):
    """Every gradient of every task (zeros for an absent one's) equals one call per row."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    T, lead = 3, (5, 4)
    params = _compacter_args(T, dtype=dtype, shared=False)
    x = torch.randn(*lead, 32, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    ids = torch.tensor(present, device=DEVICE)[torch.randint(0, len(present), (lead[0], 1))]

    def fused(x, *p):
        return ck.multitask_compacter_adapter(x, ids, *p, backend=backend)

    def naive(x, *p):
        return _per_row(x, ids, p, _compacter_slices, ck.reference.compacter_adapter)

    check_op(fused, naive, (x, *params), dtype, f"tasks {present} of {T}, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int8, torch.int16, torch.int32, torch.uint8]
                         + [getattr(torch, f"uint{b}") for b in (16, 32, 64) if hasattr(torch, f"uint{b}")])
def test_every_integer_id_dtype_is_accepted(backend, id_dtype):
    dtype = torch.float64 if backend == "reference" else torch.float32
    T = 3
    params = _compacter_args(T, dtype=dtype)
    x = torch.randn(7, 32, dtype=dtype, device=DEVICE)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2], device=DEVICE)
    want = ck.multitask_compacter_adapter(x, ids, *params, backend=backend)
    got = ck.multitask_compacter_adapter(x, ids.to(id_dtype), *params, backend=backend)
    assert torch.equal(got, want)
    if id_dtype == getattr(torch, "uint64", None):  # 2**64 - 1 is not a task, whatever its bits read as
        with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
            ck.multitask_compacter_adapter(x, torch.full((7,), 2**64 - 1, dtype=id_dtype), *params, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_widths_of_the_dense_op(backend):
    """d_model = 0 (no features) and a bottleneck of width 0: y = r (+ scale * b_up), every
    gradient of its shape."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    T = 3
    ids = torch.tensor([[1], [0]], device=DEVICE)
    for d, k in ((0, 4), (6, 0), (0, 0)):
        g = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE).requires_grad_()  # noqa: E731
        params = (g(T, d, k), g(T, k), g(T, k, d), g(T, d))
        x = g(2, 5, d)
        y = ck.multitask_adapter(x, ids, *params, backend=backend)
        want = _per_row(x, ids, params, _dense_slices, ck.reference.adapter, activation="gelu", scale=1.0)
        torch.testing.assert_close(y, want)
        grads = torch.autograd.grad(y.sum(), (x, *params), allow_unused=True, materialize_grads=True)
        assert [t.shape for t in grads] == [t.shape for t in (x, *params)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dense", [True, False])
def test_second_derivatives_of_both_mixed_task_ops(backend, dense):
    dtype = torch.float64 if backend == "reference" else torch.float32
    T = 3
    x = torch.randn(9, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1], device=DEVICE)
    if dense:
        g = lambda *s: (0.3 * torch.randn(*s, dtype=dtype, device=DEVICE)).requires_grad_()  # noqa: E731
        params = [g(T, 32, 8), g(T, 8), g(T, 8, 32), g(T, 32)]
        fused = lambda x, *p: ck.multitask_adapter(x, ids, *p, backend=backend)  # noqa: E731
        naive = lambda x, *p: _per_row(x, ids, p, _dense_slices, ck.reference.adapter, activation="gelu",  # noqa
                                       scale=1.0)
    else:
        params = _compacter_args(T, dtype=dtype)
        fused = lambda x, *p: ck.multitask_compacter_adapter(x, ids, *p, backend=backend)  # noqa: E731
        naive = lambda x, *p: _per_row(x, ids, p, _compacter_slices, ck.reference.compacter_adapter)  # noqa: E731
    leaves = [x] + [p for p in params if p is not None]
    unique = list({id(t): t for t in leaves}.values())

    def penalty(fn):
        (gx,) = torch.autograd.grad(fn(x, *params).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), unique)

    for a, b in zip(penalty(fused), penalty(naive)):  # fp32: a sum of products that cancel, hence the tolerance
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-7 if dtype == torch.float64 else 5e-3,
                                   atol=(1e-9 if dtype == torch.float64 else 5e-3) * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_gives_the_tangent(backend):
    """A dual x (or dual parameters) gets y's tangent, with frozen weights and on a repeated call
    of the same shapes too: never a y without its tangent."""
    import torch.autograd.forward_ad as fwAD

    dtype = torch.float64 if backend == "reference" else torch.float32
    T = 3
    params = [None if p is None else p.detach() for p in _compacter_args(T, dtype=dtype)]  # frozen
    x = torch.randn(6, 32, dtype=dtype, device=DEVICE)
    ids = torch.tensor([2, 0, 1, 1, 0, 2], device=DEVICE)
    tx = torch.randn_like(x)
    f = lambda x: ck.multitask_compacter_adapter(x, ids, *params, backend=backend)  # noqa: E731
    _, want = torch.func.jvp(lambda x: ck.multitask_compacter_adapter(x, ids, *params, backend="reference"),
                             (x,), (tx,))
    for _ in range(2):
        f(x)  # an earlier call of the same shapes
        with fwAD.dual_level():
            y = f(fwAD.make_dual(x, tx))
            tangent = fwAD.unpack_dual(y).tangent
        assert tangent is not None
        torch.testing.assert_close(tangent, want, rtol=1e-4, atol=1e-5)


def test_the_mixed_task_ops_read_nothing_back_under_compile():
    """torch.compile(fullgraph=True) takes both mixed-task ops whole (no bincount().tolist(), no
    range check) on every backend, forward and backward, with the eager values."""
    for backend in BACKENDS:
        dtype = torch.float64 if backend == "reference" else torch.float32
        params = _compacter_args(3, dtype=dtype)
        x = torch.randn(2, 5, 32, dtype=dtype, device=DEVICE, requires_grad=True)
        ids = torch.tensor([[2], [0]], device=DEVICE)

        def f(x, *p):
            return ck.multitask_compacter_adapter(x, ids, *p, backend=backend)

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        leaves = [x] + list({id(p): p for p in params if p is not None}.values())
        y, y_eager = compiled(x, *params), f(x, *params)
        torch.testing.assert_close(y, y_eager)
        for a, b in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(y_eager.sum(), leaves)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("per_task_rule,shared", [(False, True), (False, False), (True, False)])
def test_multitask_gradients_in_column_chunks(narrow_column_chunks, per_task_rule, shared):
    """factor_grads in chunks of 8 columns for a mixed-task batch: each task's d left summed
    over the chunks, rules the tasks share summed over them."""
    T, lead = 3, (3, 7)
    params = _compacter_args(T, d=48, k=40, n=2, rank=4, dtype=torch.float32, per_task_rule=per_task_rule,
                             shared=shared)
    x = torch.randn(*lead, 48, dtype=torch.float64).to(DEVICE, torch.float32).requires_grad_()
    ids = _ids("per_token", T, lead)

    def fused(x, *p):
        return ck.multitask_compacter_adapter(x, ids, *p, activation="silu", scale=0.5, backend="triton")

    def naive(x, *p):
        return _per_row(x, ids, p, _compacter_slices, ck.reference.compacter_adapter, activation="silu", scale=0.5)

    check_op(fused, naive, (x, *params), torch.float32, f"multitask in column chunks shared={shared}")
