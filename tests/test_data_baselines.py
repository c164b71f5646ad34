"""Baselines on hand-made samples where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from hsoftmax.data.baselines import predict, run_baselines
from hsoftmax.data.samples import SampleSet
from hsoftmax.metrics import metrics_from_lists


def _set(rows):
    """rows: (user, history locations, target)."""
    samples = []
    for u, hist, y in rows:
        n = len(hist)
        samples.append({
            "X": np.array(hist, dtype=np.int64),
            "user_X": np.full(n, u, dtype=np.int64),
            "weekday_X": np.zeros(n, dtype=np.int64),
            "start_min_X": np.full(n, 600, dtype=np.int64),
            "dur_X": np.full(n, 60, dtype=np.int64),
            "diff": np.zeros(n, dtype=np.int64),
            "Y": y,
        })  # fmt: skip
    return SampleSet.from_mhsa(samples)


TRAIN = _set(
    [
        (1, [2, 3], 2),  # user 1: 3 -> 2
        (1, [2, 3], 2),
        (1, [3, 2], 4),  # user 1: 2 -> 4
        (1, [3, 2], 4),
        (1, [4, 2], 3),  # user 1: 2 -> 3 once
        (2, [5, 2], 5),  # user 2: 2 -> 5 (twice), visits 5 most
        (2, [5, 2], 5),
        (2, [6, 5], 6),  # user 2: 5 -> 6
    ]
)
V = 8


def test_most_frequent_uses_user_counts_then_popularity():
    test = _set([(1, [5, 6], 2), (2, [2, 3], 5)])
    p = predict("most_frequent", TRAIN, test, V)
    assert p[0][:3].tolist() == [2, 4, 3]  # user 1: 2 (x2), 4 (x2, larger id), 3
    assert p[1][:2].tolist() == [5, 6]
    assert 0 not in p[0]


def test_markov_user_then_global_then_popularity():
    test = _set(
        [
            (1, [4, 2], 4),  # user 1 from 2: 4 (x2) before 3 (x1)
            (2, [7, 3], 2),  # user 2 never left 3: global chain from 3 says 2
            (1, [2, 7], 5),  # nobody left 7: popularity (2, 4, 5 twice each; ties by id)
        ]
    )
    p = predict("markov", TRAIN, test, V)
    assert p[0][:2].tolist() == [4, 3]
    assert p[0][2] == 5  # then the global successors of 2 (5 from user 2)
    assert p[1][0] == 2
    assert p[2][:4].tolist() == [2, 4, 5, 3]
    m = metrics_from_lists(p, test.y)
    assert m["acc@1"] == pytest.approx(100 * 2 / 3)
    assert m["mrr"] == pytest.approx(100 * (1 + 1 + 1 / 3) / 3)
    assert m["acc@5"] == pytest.approx(100.0)


def test_history_frequency_ranks_window_by_count_then_recency():
    test = _set([(1, [3, 4, 4, 3, 6], 6)])
    p = predict("history_frequency", TRAIN, test, V)
    assert p[0][:3].tolist() == [3, 4, 6]  # 3 and 4 twice, 3 more recent; then 6


def test_run_baselines_metrics_are_consistent():
    res = run_baselines(TRAIN, TRAIN, V)
    for name, m in res.items():
        assert 0 <= m["acc@1"] <= m["acc@5"] <= m["acc@10"] <= 100, name
        assert m["n"] == len(TRAIN)
    with pytest.raises(ValueError, match="unknown baseline"):
        predict("oracle", TRAIN, TRAIN, V)
