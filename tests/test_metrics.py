"""MHSA metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsoftmax.metrics import format_table, metrics_from_ranks, per_user_metrics


def test_hand_computed_case():
    # 4 samples: ranks 1, 3, 12, 2; targets 5, 6, 5, 7; top-1 predictions 5, 5, 7, 6
    ranks = [1, 3, 12, 2]
    y = [5, 6, 5, 7]
    top1 = [5, 5, 7, 6]
    m = metrics_from_ranks(ranks, top1, y)
    assert m["n"] == 4
    assert m["acc@1"] == pytest.approx(25.0)
    assert m["acc@5"] == pytest.approx(75.0)
    assert m["acc@10"] == pytest.approx(75.0)
    assert m["mrr"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 12 + 1 / 2) / 4)
    ndcg = (1 / math.log2(2) + 1 / math.log2(4) + 0 + 1 / math.log2(3)) / 4
    assert m["ndcg@10"] == pytest.approx(100 * ndcg)
    # weighted F1 by hand: class 5: tp 1, fp 1 (pred 5 for y 6), fn 1 (y 5 pred 7) -> P=R=1/2,
    # F1 1/2, support 2; class 6: tp 0 -> F1 0, support 1; class 7: tp 0 -> F1 0, support 1.
    assert m["f1"] == pytest.approx(100 * (0.5 * 2 + 0 + 0) / 4)


def test_perfect_and_tensor_inputs():
    y = torch.tensor([3, 1, 2])
    m = metrics_from_ranks(torch.ones(3, dtype=torch.long), y, y)
    for k in ("acc@1", "acc@5", "acc@10", "mrr", "ndcg@10", "f1"):
        assert m[k] == pytest.approx(100.0), k


def test_mrr_uses_full_ranking():
    # a rank beyond any cut-off still counts 1/rank
    m = metrics_from_ranks([1000], [0], [1])
    assert m["mrr"] == pytest.approx(0.1)
    assert m["acc@10"] == 0.0 and m["ndcg@10"] == 0.0


def test_inconsistent_inputs_raise():
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks([0], [1], [1])
    with pytest.raises(ValueError, match="disagrees"):
        metrics_from_ranks([1], [2], [1])
    with pytest.raises(ValueError, match="one shape"):
        metrics_from_ranks([1, 2], [1], [1])


def test_empty():
    m = metrics_from_ranks([], [], [])
    assert m["n"] == 0 and np.isnan(m["acc@1"])


def test_per_user():
    ranks, top1, y, user = [1, 2, 1, 4], [3, 1, 2, 9], [3, 4, 2, 5], [7, 7, 8, 8]
    t = per_user_metrics(ranks, top1, y, user)
    assert t["user"].tolist() == [7, 8]
    assert t["acc@1"].tolist() == pytest.approx([50.0, 50.0])
    assert t["mrr"].tolist() == pytest.approx([75.0, 62.5])
    assert t["n"].tolist() == [2, 2]


def test_format_table():
    m = metrics_from_ranks([1, 2], [0, 5], [0, 1])
    text = format_table({"dense": m})
    assert text.splitlines()[0].startswith("| | acc@1")
    assert "| dense | 50.00 |" in text


def test_fractional_ranks_are_refused():
    with pytest.raises(ValueError, match="whole numbers"):
        metrics_from_ranks(np.array([1.0, 2.7]), np.array([3, 1]), np.array([3, 2]))
