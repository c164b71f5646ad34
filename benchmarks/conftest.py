"""Benchmark settings shared by every file in benchmarks/ (pytest-benchmark).

Run: pytest benchmarks/ --benchmark-only   (add --quick for the small subset)
Threads are pinned to 2 so figures are comparable across machines of this project's size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

NUM_THREADS = 2
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/providers.py
sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))  # shared configs, city


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="run only the quick benchmark subset")


def pytest_configure(config):
    torch.set_num_threads(NUM_THREADS)
    config.addinivalue_line("markers", "quick: part of the --quick benchmark subset")


def pytest_collection_modifyitems(config, items):
    """--quick keeps the benchmarks marked quick (and files that mark none are kept whole)."""
    if not config.getoption("--quick"):
        return
    keep = [item for item in items if item.get_closest_marker("quick")]
    files_with_quick = {item.path for item in keep}
    keep += [item for item in items if item.path not in files_with_quick]
    deselected = [item for item in items if item not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item in keep]
