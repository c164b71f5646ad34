"""The trainer at V >= 100,000 classes (row-sparse head and embedding), CI-sized.

The `small` preset's samples with their location ids spread over 100,002 classes by a fixed
random injective map: the model has a 100,002-way head and input embedding, while the data stay
small enough to train in seconds.  ``experiments/scale_train.py`` is the same check at full size
(the seed model on the ``diy-100k`` preset).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from hsoftmax.data import MobilityDataset, load_preset
from hsoftmax.models import build_model
from hsoftmax.training import evaluate_model, load_config, train

V = 100_002  # 100,000 locations + padding (0) + unseen (1)
QUIET = {"echo": lambda *a, **k: None}


def _spread(samples, table: np.ndarray):
    return dataclasses.replace(samples, loc=table[samples.loc], y=table[samples.y])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    data = load_preset("small", seed=0, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    rng = np.random.default_rng(0)
    # ids 0 (padding) and 1 (unseen) keep their meaning; locations go to random ids in [2, V)
    table = np.concatenate([[0, 1], 2 + rng.permutation(V - 2)[: data.n_locations - 2]])
    location_ids = np.full(V, -1, dtype=np.int64)
    location_ids[table] = data.location_ids
    return dataclasses.replace(
        data,
        train=_spread(data.train, table),
        validation=_spread(data.validation, table),
        test=_spread(data.test, table),
        n_locations=V,
        location_ids=location_ids,
        locations=pd.DataFrame(),
    )


def _most_frequent_acc1(train_set, test_set) -> float:
    """Acc@1 of predicting each user's most frequent training target (ties: smaller id), in
    plain numpy: the users of the test samples are those of their last history stay."""
    users_train = train_set.user[train_set.hist_end - 1]
    pairs, counts = np.unique(np.stack([users_train, train_set.y]), axis=1, return_counts=True)
    best = {}
    # pairs come sorted by (user, id), so a tie keeps the smaller id
    for (u, y), c in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if u not in best or c > best[u][0]:
            best[u] = (c, y)
    users_test = test_set.user[test_set.hist_end - 1]
    pred = np.array([best.get(u, (0, -1))[1] for u in users_test.tolist()])
    return float((pred == test_set.y).mean() * 100)


def test_row_sparse_training_at_100k_classes_learns(wide, tmp_path):
    assert wide.n_locations >= 100_000
    cfg = load_config(
        None,
        [
            "name=wide", "data.preset=small", f"output.dir={tmp_path}", "train.progress=false",
            "train.num_threads=1", "train.epochs=2", "train.batch_size=32", "train.lr=0.005",
            "train.label_smoothing=0.0", "train.allow_over_budget=true",
            "train.optimizer=sparse_adamw", "model.sparse=true", "model.dropout=0.1",
            "model.tree=balanced", "model.tree_arity=2", "model.loc_emb_dim=32",
            "model.user_emb_dim=16", "model.time_emb_dim=4", "model.weekday_emb_dim=2",
            "model.duration_emb_dim=4", "model.diff_emb_dim=2", "model.d_model=32",
            "model.num_layers=1", "model.nhead=2", "model.dim_feedforward=64",
        ],
    )  # fmt: skip
    torch.manual_seed(cfg["train"]["seed"])
    untrained = build_model(cfg["model"], wide)
    assert untrained.head.num_classes == V
    before = evaluate_model(untrained, MobilityDataset(wide.validation), 512, "cpu")
    result = train(cfg, data=wide, **QUIET)
    assert result.params["total"] > V * 32  # the 100K-row embedding and head are in the model
    val = [row["val_nll"] for row in result.history]
    assert val[0] < before["nll"] - 1.0 and val[-1] < val[0], (before["nll"], val)
    baseline = _most_frequent_acc1(wide.train, wide.test)
    assert result.test["acc@1"] > baseline, (result.test["acc@1"], baseline)
