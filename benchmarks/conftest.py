"""Benchmark settings shared by every file in benchmarks/ (pytest-benchmark).

Run: pytest benchmarks/ --benchmark-only   (add --quick for the small subset)
Threads are pinned to 2 so figures are comparable across machines of this project's size.
"""

from __future__ import annotations

import pytest
import torch

NUM_THREADS = 2


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="run only the quick benchmark subset")


def pytest_configure(config):
    torch.set_num_threads(NUM_THREADS)


@pytest.fixture
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))
