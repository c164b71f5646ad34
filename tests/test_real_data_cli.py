"""The first commands a researcher runs on files trackintel and MHSA wrote: ``hsoftmax train
--data``, ``tree build``, ``predict`` and ``evaluate`` (from another directory), end to end.

The files come from the writers of ``test_data_formats.py`` (trackintel's CSV layout with DBSCAN
noise and WKT geometries; MHSA's pickles with float durations, two ``previous_day`` variants and
trackintel's ``locations.csv`` beside them).
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from test_data_formats import _write_trackintel, mhsa_dir, trackintel_frames  # noqa: F401

from hsoftmax import Tree
from hsoftmax.cli import main
from hsoftmax.training import load_checkpoint

# a tiny model: these tests check the plumbing, not the accuracy
TINY = [
    "--set", "model.d_model=16", "--set", "model.num_layers=1", "--set", "model.nhead=2",
    "--set", "model.dim_feedforward=16", "--set", "train.epochs=1",
    "--set", "train.max_steps_per_epoch=3", "--set", "train.val_metrics=false",
    "--set", "model.tree_branching=8", "--no-progress",
]  # fmt: skip


def _train(tmp_path, *args) -> str:
    out = tmp_path / "runs"
    assert main(["train", *args, *TINY, "--out", str(out)]) == 0
    (run,) = out.iterdir()
    return str(run)


@pytest.fixture
def staypoint_dir(trackintel_frames, tmp_path):  # noqa: F811 (the imported fixture)
    full, locs, _ = trackintel_frames
    return _write_trackintel(full, locs, tmp_path / "geolife_sp")


def test_trackintel_staypoints_train_predict_evaluate(
    staypoint_dir,
    trackintel_frames,  # noqa: F811 (the imported fixture)
    tmp_path,
    monkeypatch,
    capsys,
):
    full, _, clean = trackintel_frames
    run = _train(
        tmp_path, "--data", str(staypoint_dir), "--set", "data.previous_day=7",
        "--set", "data.split=0.6,0.2,0.2",
    )  # fmt: skip
    assert "geolife_sp-" in run  # named after the data, not "demo"
    per_user = pd.read_csv(f"{run}/per_user.csv")
    assert set(per_user["user"]) <= set(clean["user_id"])  # original ids (101, 103, ...)
    # from another working directory: the run recorded its absolute data path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["predict", run, "--out", "pred.csv", "--k", "5"]) == 0
    pred = pd.read_csv(elsewhere / "pred.csv")
    assert list(pred.columns[:3]) == ["user", "target", "loc_1"]
    assert len(pred.columns) == 2 + 5 + 5
    known = set(clean["location_id"]) | {-1}  # -1: padding / unseen in training
    assert set(pred[[f"loc_{j}" for j in range(1, 6)]].to_numpy().ravel()) <= known
    assert set(pred["target"]) <= known and set(pred["user"]) <= set(clean["user_id"])
    probs = pred[[f"p_{j}" for j in range(1, 6)]].to_numpy()
    assert (probs[:, :-1] >= probs[:, 1:]).all() and ((probs > 0) & (probs <= 1)).all()
    capsys.readouterr()
    assert main(["evaluate", run, "--no-progress"]) == 0
    assert "test (best)" in capsys.readouterr().out


def test_mhsa_pickles_train_with_the_default_model(mhsa_dir, tmp_path, capsys):  # noqa: F811
    d, _, _ = mhsa_dir  # MHSA's layout: data/dataSet_geolife.csv, data/temp/*.pk
    # two previous_day variants in one directory: ambiguous until one is chosen
    assert main(["train", "--data", str(d), *TINY, "--out", str(tmp_path / "r0")]) == 1
    assert "previous_day" in capsys.readouterr().err
    run = _train(tmp_path, "--data", str(d), "--set", "data.previous_day=7")
    assert main(["predict", run, "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) > 0


def test_tree_files_from_trackintel_locations_train(staypoint_dir, tmp_path, capsys):
    # a tree over the data's whole vocabulary (padding and unseen included) fits the model
    tree_file = tmp_path / "kmeans.hst"
    argv = ["tree", "build", "--method", "kmeans", "--data", str(staypoint_dir)]
    assert main([*argv, "--branching", "8", "--out", str(tree_file), "--no-progress"]) == 0
    run = _train(tmp_path, "--data", str(staypoint_dir), "--set", f"model.tree={tree_file}")
    assert load_checkpoint(f"{run}/ckpt.pt")["model"]["output.head.tree_parents"].numel() == len(
        Tree.load(tree_file).parents
    )
    # a tree over the rows of trackintel's locations.csv (WKT centers) misses padding/unseen
    rows = tmp_path / "rows.hst"
    argv = [
        "tree",
        "build",
        "--method",
        "kmeans",
        "--features",
        str(staypoint_dir / "locations.csv"),
    ]
    assert main([*argv, "--branching", "8", "--out", str(rows), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(staypoint_dir), "--set", f"model.tree={rows}", *TINY,
                 "--out", str(tmp_path / "r2")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "leaves but the data has V =" in err and "--method kmeans --data" in err


def test_cooccurrence_tree_trains(staypoint_dir, tmp_path):
    run = _train(tmp_path, "--data", str(staypoint_dir), "--set", "model.tree=cooccurrence")
    assert (tmp_path / run / "test_metrics.json").is_file()


def test_damaged_run_files_give_one_line_errors(staypoint_dir, tmp_path, capsys):
    run = _train(tmp_path, "--data", str(staypoint_dir), "--name", "mine")
    assert "mine-" in run
    ckpt = tmp_path / "copy" / "ckpt.pt"
    shutil.copytree(run, ckpt.parent)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    capsys.readouterr()
    assert main(["evaluate", str(ckpt.parent), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "ckpt.pt: not a readable hsoftmax checkpoint" in err and "Traceback" not in err
    tree_file = tmp_path / "t.hst"
    tree_file.write_bytes(b"PK\x03\x04 not a zip")
    assert main(["train", "--data", str(staypoint_dir), "--set", f"model.tree={tree_file}",
                 *TINY, "--out", str(tmp_path / "r3")]) == 1  # fmt: skip
    assert "t.hst: not a readable hsoftmax tree file" in capsys.readouterr().err
