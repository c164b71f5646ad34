"""experiments/time_to_accuracy.py: configuration names, the target and the time to reach it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
tta = pytest.importorskip("time_to_accuracy")


def _curve(points):
    return [
        {"samples": 1000 * i, "train_seconds": 2.5 * i, "val_acc@1": acc}
        for i, acc in enumerate(points)
    ]


def test_time_to_target_is_the_first_point_at_or_above_it():
    curve = _curve([1.0, 20.0, 30.0, 29.0, 31.0])
    assert tta.time_to_target(curve, 30.0) == (5.0, 2000)  # reached exactly, not after
    assert tta.time_to_target(curve, 30.5) == (10.0, 4000)  # the dip does not count
    assert tta.time_to_target(curve, 31.5) == (None, None)


def test_target_is_the_best_dense_configuration_best_point_minus_a_tenth():
    results = [
        {"config": "dense", "seed": 0, "curve": _curve([0, 40.0, 39.0])},
        {"config": "dense+mixture", "seed": 0, "curve": _curve([0, 41.0, 42.0])},
        {"config": "dense+mixture", "seed": 1, "curve": _curve([0, 44.0])},
        {"config": "hs-kmeans128", "seed": 0, "curve": _curve([0, 50.0])},  # not a dense one
    ]
    target, name = tta.target_of(results)
    assert name == "dense+mixture"
    assert target == pytest.approx((42.0 + 44.0) / 2 - 0.1)
    with pytest.raises(SystemExit, match="at least one dense configuration"):
        tta.target_of(results[3:])


def test_configuration_names_compose_levers():
    base = tta.CONFIGS["hs-kmeans128+mixture+nodes"]
    assert tta.overrides_of("hs-kmeans128+mixture+nodes") == base
    assert tta.overrides_of("hs-kmeans128+mixture+nodes+prior+headlr2") == [
        *base, "model.prior_init=true", "train.head_lr_mult=2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown configuration 'dense\\+bogus'"):
        tta.overrides_of("dense+bogus")


def test_table_reports_ratios_and_an_unreached_target():
    def run(config, points, acc):
        return {
            "config": config, "seed": 0, "curve": _curve(points), "epochs": 3,
            "samples_per_second": 100.0,
            "test": {"acc@1": acc, "acc@5": 60.0, "mrr": 50.0, "nll": 3.0},
        }  # fmt: skip

    results = [run("dense", [0, 10, 40], 41.0), run("hs-binary", [0, 40], 42.0)]
    results.append(run("hs-huffman", [0, 5], 30.0))
    text = tta.table(results, 39.9, "dense")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["dense"][4:8] == ["5", "2,000", "1.00", "1.00"]
    assert rows["hs-binary"][4:8] == ["2", "1,000", "0.50", "0.50"]
    assert rows["hs-huffman"][4].startswith("not reached (1/1 seeds)")
    # by half of dense's 5 s: the points at 0 and 2.5 s
    assert [rows[k][8] for k in ("dense", "hs-binary", "hs-huffman")] == ["10.00", "40.00", "5.00"]
