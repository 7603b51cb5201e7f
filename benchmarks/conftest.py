"""The pytest-benchmark suite: the cases of `python -m compacter_kernels.bench`, for that tool.

    python -m pytest benchmarks/ --benchmark-json=bench.json     # GPU providers skip without a GPU

Not part of the default test run (`pytest tests`). Times are wall clock around a synchronised
call (pytest-benchmark has no CUDA-event timer); the command's CUDA-event timings are the ones
to quote.
"""

import pytest
import torch

from compacter_kernels.bench import report

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Our run metadata (device, driver, versions, commit, date) beside pytest-benchmark's own.
    command = " ".join(["pytest", *config.invocation_params.args])
    output_json["compacter_kernels"] = report.metadata(DEVICE, command)
