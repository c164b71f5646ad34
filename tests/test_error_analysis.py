"""experiments/error_analysis.py on a real tiny run (the user memory with context counts): its
target groups against a per-sample check, its Acc@1 figures against the trainer's own test
metrics and the baselines module."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hsoftmax.data.baselines import run_baselines
from hsoftmax.training import train
from hsoftmax.training.data import load_data

from conftest import QUIET, cache_dir, small_config  # noqa: F401  (cache_dir: a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
error_analysis = pytest.importorskip("error_analysis")


def test_error_analysis_of_a_context_memory_run(cache_dir, tmp_path):  # noqa: F811
    cfg = small_config(
        cache_dir,
        tmp_path,
        "train.epochs=1",
        "model.user_memory=8",
        "model.user_memory_context=true",
    )
    result = train(cfg, **QUIET)
    out = error_analysis.analyse(result.run_dir)
    assert out["acc@1"] == pytest.approx(result.test["acc@1"], abs=1e-9)

    data = load_data(cfg["data"], progress=False)
    train_set, test = data.train, data.test
    seen = set(zip(train_set.sample_user.tolist(), train_set.y.tolist(), strict=True))
    groups = error_analysis.target_groups(train_set, test)
    for i in range(len(test.y)):
        y = int(test.y[i])
        window = y in set(test.loc[test.hist_start[i] : test.hist_end[i]].tolist())
        user = (int(test.sample_user[i]), y) in seen
        assert groups["window"][i] == window
        assert groups["user_train"][i] == (not window and user)
        assert groups["new"][i] == (not window and not user)
    assert sum(g["share"] for g in out["groups"].values()) == pytest.approx(100.0)
    ref = run_baselines(train_set, test, data.n_locations, error_analysis.BASELINES)
    for name, v in out["baselines"].items():
        assert v["acc@1"] == pytest.approx(ref[name]["acc@1"])
        assert v["either_right"] >= max(v["acc@1"], out["acc@1"]) - 1e-9
    shares = np.array([g["share"] for g in out["groups"].values()])
    assert (shares > 0).sum() >= 2  # the tiny set has targets in more than one group
