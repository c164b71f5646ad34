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
    assert tta.overrides_of("dense+mixture+lr2+layers2") == [
        *tta.CONFIGS["dense+mixture"], "train.lr=0.002", "model.num_layers=2",
    ]  # fmt: skip
    assert tta.overrides_of("dense+mixture+layers3")[-1] == "model.num_layers=3"
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
    results += [run("hs-kmeans", [0, 5, 5, 40], 40.0), run("hs-kmeans", [0, 5], 40.0)]
    text = tta.table(results, 39.9, "dense")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["dense"][4:8] == ["5", "2,000", "1.00", "1.00"]
    assert rows["hs-binary"][4:8] == ["2", "1,000", "0.50", "0.50"]
    assert rows["hs-huffman"][4:8] == ["not reached", "–", "–", "–"]
    # one of two seeds reached it (at 7.5 s, 3,000 samples): its figures, marked as such
    assert rows["hs-kmeans"][4:8] == ["8 (1/2 seeds)", "3,000 (1/2 seeds)", "1.50", "1.50"]
    # by half of dense's 5 s: the points at 0 and 2.5 s
    assert [rows[k][8] for k in ("dense", "hs-binary", "hs-huffman")] == ["10.00", "40.00", "5.00"]
    assert rows["hs-kmeans"][8] == "5.00"


def test_each_tree_configuration_is_paired_with_the_dense_one_of_the_same_history():
    assert tta.dense_counterpart("hs-kmeans128+mixture+nodes+memory+context") == (
        "dense+mixture+memory+context"
    )
    assert tta.dense_counterpart("hs-kmeans128") == "dense"
    assert tta.dense_counterpart("hs-kmeans128+nodes+frequent1000") == "dense"
    assert tta.dense_counterpart("hs-binary+mixture+prior") == "dense+mixture+prior"
    assert tta.dense_counterpart("dense+mixture") is None

    def run(config, seed, points, acc):
        return {
            "config": config, "seed": seed, "curve": _curve(points),
            "test": {"acc@1": acc, "mrr": acc + 10},
        }  # fmt: skip

    results = [
        # the target is the dense runs' best points' mean - 0.1 = (40 + 30) / 2 - 0.1
        run("dense", 0, [0, 10, 40], 41.0),  # reached at 5 s
        run("dense", 1, [0, 30, 20], 43.0),  # never reached
        run("hs-binary", 0, [0, 35], 42.0),  # reached at 2.5 s
        run("hs-binary", 1, [0, 20, 20, 36], 44.0),  # reached at 7.5 s
        run("hs-huffman+mixture", 0, [0, 50], 50.0),  # no dense+mixture ran: no row
    ]
    text = tta.pairs_table(results)
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert len(rows) == 1
    assert rows[0][1:9] == [
        "dense", "34.90", "5 (2/2 seeds)", "5 (1/2 seeds)", "1.00",
        "27.50 / 20.00", "43.00 / 42.00", "53.00 / 52.00 |",
    ]  # fmt: skip  # by half of dense's 5 s: the best points up to 2.5 s
    assert tta.pairs_table(results[4:]) == ""


def test_a_real_tiny_run_with_two_jobs_gives_every_curve_and_the_table(tmp_path, monkeypatch):
    """``--jobs 2``: two ``python -m hsoftmax train`` processes at a time, every run's curve and
    test metrics in results.json, one table row per configuration and the plot."""
    import json

    import hsoftmax

    monkeypatch.chdir(tmp_path)  # the child imports the hsoftmax this test imported
    monkeypatch.setenv("PYTHONPATH", str(Path(hsoftmax.__file__).resolve().parent.parent))
    tiny = [
        f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps_per_epoch=3",
        "train.batch_size=32", "train.num_threads=1", "model.d_model=16", "model.nhead=2",
        "model.num_layers=1", "model.dim_feedforward=16", "model.tree=balanced",
    ]  # fmt: skip
    argv = ["--preset", "small", "--epochs", "1", "--seeds", "0", "1", "--jobs", "2"]
    argv += ["--eval-every", "32", "--eval-samples", "40", "--out", str(tmp_path / "out")]
    argv += [x for s in tiny for x in ("--set", s)]
    assert tta.main([*argv, "--configs", "dense", "hs-binary"]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("dense", 0), ("dense", 1), ("hs-binary", 0), ("hs-binary", 1),
    ]  # fmt: skip
    for r in rows:  # a point before training, then every 32 samples of the 3 x 32
        assert [p["samples"] for p in r["curve"]] == [0, 32, 64, 96]
        assert 0.0 <= r["test"]["acc@1"] <= 100.0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "2 run(s) at a time" in table
    main_table, pairs = table.split("\n\n")[1], table.split("\n\n")[3]
    assert [line.split(" | ")[0] for line in main_table.splitlines()[2:]] == [
        "| dense", "| hs-binary",
    ]  # fmt: skip
    assert [line.split(" | ")[:2] for line in pairs.splitlines()[2:]] == [["| hs-binary", "dense"]]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_jobs_below_one_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tta.main(["--jobs", "0", "--out", str(tmp_path / "out")])
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
