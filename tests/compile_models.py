"""Child process of tests/test_compile_models.py: a small BERT with fused adapters, one training
step's loss and every gradient under torch.compile(fullgraph=True) against eager, for one backend.

    python tests/compile_models.py BACKEND     prints one "ok <mode>" line per mode, or fails
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before compacter_kernels is imported
import emulation  # noqa: E402  (tests/ is on sys.path: this file's folder)

if emulation.requested() and not torch.cuda.is_available():
    emulation.enable()

import adapters  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from compacter_kernels.integrations.adapterhub import fuse_adapters  # noqa: E402
from compacter_kernels.integrations.transformers import add_adapters  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def model_for(mode: str, backend: str):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SMALL, num_labels=2))
    if mode == "add_adapters":
        add_adapters(model, "compacter", reduction_factor=4, backend=backend)
    else:
        adapters.init(model)
        names = ["a", "b", "c"] if mode == "batch_split" else ["a"]
        for name in names:
            model.add_adapter(name, config=adapters.CompacterConfig(reduction_factor=4))
        model.train_adapter(names)
        if mode == "batch_split":  # a task with no rows too
            model.active_adapters = adapters.BatchSplit("a", "b", "c", batch_sizes=[2, 0, 1])
        assert fuse_adapters(model, backend=backend)
    with torch.no_grad():  # away from the near-identity init: every gradient sizeable
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return model.train()


def step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    return loss


def main(backend: str) -> None:
    ids, labels = torch.randint(0, 100, (3, 9)), torch.randint(0, 2, (3,))
    for mode in ("fuse_adapters", "batch_split", "add_adapters"):
        model = model_for(mode, backend)
        results = []
        for compiled in (False, True):
            torch._dynamo.reset()
            fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
            loss = fn(model, ids, labels)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.requires_grad}))
        (loss, grads), (loss_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss)
        assert grads.keys() == grads_c.keys() and all(g is not None for g in grads.values())
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], msg=lambda m, n=name: f"{mode}, grad of {n}: {m}")
        print("ok", mode, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
