"""Build time of the data-driven trees at DIY size (V = 15,584), one round each.

Acceptance figure of issue 3: the k-means builds of 15,584 2-D coordinates, ``branching=(128,)``
and ``"binary"``, finish in under 60 s on the project's 2-core machine.

    pytest benchmarks/test_bench_trees.py --benchmark-only
"""

from __future__ import annotations

import pytest
from tree_study import synthetic_city

from hsoftmax import trees

V = 15_584


@pytest.fixture(scope="module")
def city():
    return synthetic_city(num_locations=V, seed=0)


BUILDS = {
    "kmeans-128": lambda c: trees.from_features(c[0], branching=(128,), seed=0, coords="latlon"),
    "kmeans-binary": lambda c: trees.from_features(
        c[0], branching="binary", seed=0, coords="latlon"
    ),
    "kmeans-16x16": lambda c: trees.from_features(
        c[0], branching=(16, 16), seed=0, coords="latlon"
    ),
    "huffman": lambda c: trees.huffman(c[1]),
    "cooccurrence-150": lambda c: trees.from_cooccurrence(c[2], branching=(150,), seed=0),
}


@pytest.mark.parametrize("method", list(BUILDS))
def test_build(benchmark, city, method):
    benchmark.group = f"tree build V={V}"
    benchmark.extra_info.update(provider=method, V=V)
    tree = benchmark.pedantic(BUILDS[method], args=(city,), rounds=1, iterations=1)
    assert tree.num_leaves == V
