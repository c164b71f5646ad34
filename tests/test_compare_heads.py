"""experiments/compare_heads.py refuses to reuse or resume a run made with other settings."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from hsoftmax.training import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
compare_heads = pytest.importorskip("compare_heads")


def _recorded(tmp_path, name, args, *extra):
    run_dir = tmp_path / "runs" / f"{name}-seed0"
    run_dir.mkdir(parents=True)
    cfg = load_config(args.preset, [*compare_heads._fresh_sets(name, 0, args, run_dir), *extra])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir, load_config(args.preset, compare_heads._fresh_sets(name, 0, args, run_dir))


def test_reuse_accepts_the_same_settings_and_refuses_others(tmp_path):
    args = types.SimpleNamespace(preset="diy", epochs=100, set=["train.lr=1e-3"])
    run_dir, expected = _recorded(tmp_path, "hs-binary", args, "train.num_threads=1")
    compare_heads._check_reused(run_dir, expected)  # "1e-3" and 0.001 are the same number
    other, expected = _recorded(tmp_path / "b", "dense", args, "model.d_model=64")
    with pytest.raises(SystemExit, match=r"model.d_model=64 \(wanted 112\)"):
        compare_heads._check_reused(other, expected)
    (other / "config.yaml").write_text("model: {bogus: 1}\n")
    with pytest.raises(SystemExit, match="no longer loads"):
        compare_heads._check_reused(other, expected)


def _finished(out, name, seed, args, acc, val_nll=None):
    """A finished run directory as ``hsoftmax train`` leaves it (the files the table reads)."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    run_dir.mkdir(parents=True)
    cfg = load_config(args.preset, compare_heads._fresh_sets(name, seed, args, run_dir))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    test = {m: acc for m in compare_heads.METRICS}
    (run_dir / "test_metrics.json").write_text(json.dumps(test))
    (run_dir / "params.json").write_text(json.dumps({"total": 1000}))
    history = [{"train_seconds": s, "peak_rss_mb": 10.0} for s in (3.0, 1.0, 2.0)]
    if val_nll is not None:
        for row, v in zip(history, val_nll, strict=True):
            row["val_nll"] = v
    (run_dir / "metrics.json").write_text(json.dumps(history))


def test_results_json_keeps_earlier_calls_runs_and_their_times(tmp_path, capsys):
    args = types.SimpleNamespace(preset="diy", epochs=7, set=[])
    earlier = {"config": "dense", "seed": 1, "test": {}, "wall_seconds": 123.0}
    reused = {"config": "hs-binary", "seed": 0, "test": {}, "wall_seconds": 456.0}
    (tmp_path / "results.json").write_text(json.dumps([earlier, reused]))
    _finished(tmp_path, "hs-binary", 0, args, 40.0)
    _finished(tmp_path, "dense+mixture", 0, args, 50.0)
    argv = ["--preset", "diy", "--epochs", "7", "--seeds", "0", "--out", str(tmp_path), "--reuse"]
    assert compare_heads.main([*argv, "--configs", "hs-binary", "dense+mixture"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("dense", 1),
        ("hs-binary", 0),
        ("dense+mixture", 0),
    ]
    assert rows[0] == earlier  # another call's run, untouched
    assert rows[1]["wall_seconds"] == 456.0  # reused: its recorded time is kept
    assert rows[1]["test"]["acc@1"] == 40.0 and rows[1]["seconds_per_epoch"] == 2.0
    assert rows[2]["wall_seconds"] is None  # reused, never timed by this script
    assert "hs-binary seed 0: acc@1 40.00, 3 epochs, 2.0 s/epoch, 456 s" in capsys.readouterr().out
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a results file"):
        compare_heads.main([*argv, "--configs", "hs-binary"])


def test_table_only_tabulates_every_recorded_run_with_its_best_epoch(tmp_path, capsys, monkeypatch):
    args = types.SimpleNamespace(preset="diy", epochs=7, set=[])
    # the trainer's rule: better only by more than 1e-6, so epoch 3 does not replace epoch 2
    _finished(tmp_path, "hs-binary", 0, args, 40.0, val_nll=(3.0, 2.0, 2.0 - 1e-7))
    _finished(tmp_path, "hs-binary", 1, args, 42.0, val_nll=(3.0, 2.5, 2.4))
    _finished(tmp_path, "dense", 0, args, 44.0, val_nll=(1.0, 1.5, 1.2))
    stale = {"config": "hs-binary", "seed": 1, "test": {"acc@1": 0.0}, "wall_seconds": 5.0}
    gone = {  # a recorded run whose directory is not here: tabulated as recorded
        "config": "hs-huffman",
        "seed": 0,
        "test": {m: 30.0 for m in compare_heads.METRICS},
        "params": {"total": 1000},
        "epochs": 5,
        "seconds_per_epoch": 4.0,
        "peak_rss_mb": 9.0,
        "wall_seconds": 20.0,
    }
    rows = [stale, gone, {"config": "dense", "seed": 0}, {"config": "hs-binary", "seed": 0}]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    monkeypatch.setattr(compare_heads, "run_one", None)  # nothing may be trained
    argv = ["--preset", "diy", "--out", str(tmp_path), "--table-only"]
    assert compare_heads.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [  # CONFIGS order, then seed
        ("dense", 0),
        ("hs-binary", 0),
        ("hs-binary", 1),
        ("hs-huffman", 0),
    ]
    assert [r.get("best_epoch") for r in rows] == [1, 2, 3, None]
    assert rows[2]["test"]["acc@1"] == 42.0 and rows[2]["wall_seconds"] == 5.0
    assert rows[3] == gone
    table = (tmp_path / "table.md").read_text()
    assert table == capsys.readouterr().out
    assert "| dense | 1 | 3 (best 1) | 44.00 |" in table
    assert "| hs-binary | 2 | 3/3 (best 2/3) | 41.00 ± 1.41 |" in table
    assert "| hs-huffman | 1 | 5 | 30.00 |" in table
    # parameters, s/epoch (mean of the seeds' medians), training = epochs x s/epoch, RSS
    assert table.splitlines()[-1].endswith("| 1,000 | 4.0 | 0.3 | 9 |")  # 5 x 4.0 s = 20 s
    assert "| 1,000 | 2.0 | 0.1 | 10 |" in table  # hs-binary: 3 x 2.0 s per seed
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(SystemExit, match="holds no runs"):
        compare_heads.main(argv)


def test_a_real_tiny_comparison_trains_through_the_cli(tmp_path, capsys, monkeypatch):
    """The script starts each training as a ``python -m hsoftmax train`` process: one tiny run
    on the ``small`` preset goes all the way to a results row."""
    import hsoftmax

    # the child must import the hsoftmax this test imported (an installed one, not a checkout's
    # sources without the compiled library that the working directory would put first)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(hsoftmax.__file__).resolve().parent.parent))
    tiny = [
        "data.preset=small", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps_per_epoch=2",
        "train.num_threads=1", "model.d_model=16", "model.nhead=2", "model.num_layers=1",
        "model.dim_feedforward=16", "model.tree=balanced",
    ]  # fmt: skip
    argv = ["--preset", "diy", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path)]
    argv += [x for s in tiny for x in ("--set", s)]
    assert compare_heads.main([*argv, "--configs", "hs-binary+mixture"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["config"], r["seed"], r["epochs"]) for r in rows] == [("hs-binary+mixture", 0, 1)]
    assert 0.0 <= rows[0]["test"]["acc@1"] <= 100.0
    assert "hs-binary+mixture seed 0: acc@1" in capsys.readouterr().out
