"""`compacter-bench` / `python -m compacter_kernels.bench`: the adapter ops against the eager
reference, torch.compile and the memory floor, and an end-to-end training step (--e2e).

    python -m compacter_kernels.bench                  # full sweep on a GPU, --quick on a CPU
    python -m compacter_kernels.bench --preset t5-base --modes fwd,bwd --providers reference,triton,floor
    python -m compacter_kernels.bench --e2e --model bert-base

Modules: counts (floor bytes and FLOPs), cases (presets, providers, inputs), timing (timer,
bandwidth, memory, progress bar), report (metadata, table, JSON/CSV, plot), e2e, cli.
"""

from .cli import main

__all__ = ["main"]
