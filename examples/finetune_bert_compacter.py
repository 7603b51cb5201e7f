"""Fine-tune a small random BERT with Compacter adapters on a synthetic classification task.

    python examples/finetune_bert_compacter.py                     # add_adapters (transformers only)
    python examples/finetune_bert_compacter.py --via adapterhub    # AdapterHub + fuse_adapters

The backbone is frozen; the adapters (one shared PHM rule) and the classifier head train. Task:
does a sequence draw its tokens from the lower or the upper half of the
vocabulary? The backend is "auto": a fused kernel on
a GPU, the PyTorch reference on CPU; the script prints which one ran, the loss and the step time.
No download: the model is built from a config with random weights.
"""

import argparse
import time

import torch

import compacter_kernels as ck
from compacter_kernels import backends

NEEDS = ('needs transformers (and, for --via adapterhub, adapters): pip install "compacter-kernels[integrations]" '
         'from a checkout of compacter-kernels')


def resolved_backend(x: torch.Tensor) -> str:
    """The backend that backend="auto" runs for an input like x."""
    return backends.select("auto", x)


def build(via: str, config, reduction_factor: int):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(config)
    if via == "transformers":
        from compacter_kernels.integrations.transformers import add_adapters

        return add_adapters(model, "compacter", reduction_factor=reduction_factor, unfreeze=("classifier",))
    import adapters

    from compacter_kernels.integrations.adapterhub import fuse_adapters

    adapters.init(model)
    model.add_adapter("task", config=adapters.CompacterConfig(reduction_factor=reduction_factor))
    model.train_adapter("task")  # freezes everything but the adapter
    model.classifier.requires_grad_(True)  # the head of a plain HF model is not an AdapterHub head
    print(f"fused {len(fuse_adapters(model))} AdapterHub adapter modules")
    return model


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"This example {NEEDS}.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--via", choices=("transformers", "adapterhub"), default="transformers",
                        help="add_adapters on a plain transformers model, or AdapterHub + fuse_adapters")
    parser.add_argument("--steps", type=positive_int, default=100, help="training steps")
    parser.add_argument("--batch", type=positive_int, default=32, help="sequences per step")
    parser.add_argument("--seq", type=positive_int, default=16, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    args = parser.parse_args()
    try:
        from transformers import BertConfig
    except ImportError:
        parser.exit(2, f"{parser.prog}: this example {NEEDS}\n")

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 100
    # initializer_range 0.1 (BERT's is 0.02): a random frozen backbone whose attention mixes tokens
    # enough for the sequence-level signal to reach [CLS], standing in for pretrained features.
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        vocab_size=vocab, num_labels=2, initializer_range=0.1)
    model = build(args.via, config, reduction_factor=8).to(device).train()

    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)")
    print(f"device {device}, backend 'auto' runs: {resolved_backend(torch.empty(1, 128, device=device))} "
          f"(available: { {k: bool(v) for k, v in ck.available_backends().items()} })")

    opt = torch.optim.AdamW(params, lr=args.lr)
    losses, times = [], []
    for step in range(1, args.steps + 1):
        # Class c draws its tokens from half c of the vocabulary; position 0 plays [CLS].
        labels = torch.randint(0, 2, (args.batch,), device=device)
        ids = torch.randint(0, vocab // 2, (args.batch, args.seq), device=device) + labels[:, None] * (vocab // 2)
        ids[:, 0] = 0
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % 25 == 0 or step == 1:
            recent = losses[-25:]
            print(f"step {step:4d}  loss {sum(recent) / len(recent):.4f}  step time {1e3 * times[-1]:.1f} ms")
    # Two windows that do not overlap: 25 steps each, or the first and the last half of a short run.
    window = min(25, len(losses) // 2)
    median = sorted(times[5:])[len(times[5:]) // 2] if len(times) > 5 else times[-1]
    if window:
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(f"mean loss, first {window} steps {first:.4f} -> last {window} steps {last:.4f}; "
              f"median step {1e3 * median:.1f} ms")
    else:
        print(f"loss {losses[0]:.4f} (one step); step {1e3 * median:.1f} ms")


if __name__ == "__main__":
    main()
