"""pytest-benchmark of one training step of the end-to-end model (compacter-bench --e2e), per backend."""

import pytest
import torch
import torch.nn.functional as F

from compacter_kernels.bench import cases, e2e, timing

GPU = torch.cuda.is_available()
LAYERS, BATCH, SEQ = (12, 32, 128) if GPU else (1, 2, 64)


@pytest.mark.parametrize("model_name", ["bert-base", "t5-base"])
@pytest.mark.parametrize("backend", ["reference", *cases.FUSED])
def test_train_step(benchmark, device, model_name, backend):
    reason = cases.skip_reason(backend, device)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if GPU else torch.float32
    model = e2e.AdapterEncoder(model_name, LAYERS, backend).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, e2e.VOCAB, (BATCH, SEQ), device=device)
    labels = torch.randint(0, e2e.CLASSES, (BATCH,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids).float(), labels).backward()
        opt.step()
        timing.sync(device)

    benchmark.group = f"e2e {model_name} {LAYERS} layers batch {BATCH} seq {SEQ}"
    benchmark.pedantic(step, rounds=10 if GPU else 3, warmup_rounds=2 if GPU else 1)
