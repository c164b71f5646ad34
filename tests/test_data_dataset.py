"""Dataset + collate: shapes, padding, buckets, values, DataLoader use and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hsoftmax.data.dataset import N_DURATIONS, N_TIME_SLOTS, MobilityDataset, collate
from hsoftmax.data.samples import build_samples, save_mhsa
from hsoftmax.data.staypoints import validate_staypoints
from hsoftmax.data.synthetic import generate


@pytest.fixture(scope="module")
def data():
    sp = validate_staypoints(generate("small", seed=2, progress=False).staypoints)
    return build_samples(sp, progress=False)


def test_collate_shapes_and_values(data):
    ds = MobilityDataset(data.train)
    idx = [0, 5, 17, 3]
    batch = collate([ds[i] for i in idx])
    lengths = data.train.lengths[idx]
    B, L = len(idx), lengths.max()
    for key in ("x", "time", "weekday", "duration", "diff"):
        assert batch[key].shape == (B, L) and batch[key].dtype == torch.int64
    for key in ("lengths", "user", "y"):
        assert batch[key].shape == (B,) and batch[key].dtype == torch.int64
    assert batch["mask"].dtype == torch.bool
    assert batch["lengths"].tolist() == lengths.tolist()
    assert batch["mask"].sum(1).tolist() == lengths.tolist()
    for r, i in enumerate(idx):
        s = data.train[i]  # the MHSA dict of the same sample
        n = len(s["X"])
        assert batch["x"][r, :n].tolist() == s["X"].tolist()
        assert (batch["x"][r, n:] == 0).all()  # right padding with 0
        assert batch["time"][r, :n].tolist() == (s["start_min_X"] // 15).tolist()
        assert batch["duration"][r, :n].tolist() == np.minimum(s["dur_X"] // 30, 95).tolist()
        assert batch["weekday"][r, :n].tolist() == s["weekday_X"].tolist()
        assert batch["diff"][r, :n].tolist() == s["diff"].tolist()
        assert batch["user"][r] == s["user_X"][0] and batch["y"][r] == s["Y"]
    assert batch["time"].max() < N_TIME_SLOTS and batch["duration"].max() < N_DURATIONS


def test_dataset_from_pickle_equals_from_sampleset(data, tmp_path):
    save_mhsa(data.validation, tmp_path / "v.pk")
    a, b = MobilityDataset(tmp_path / "v.pk"), MobilityDataset(data.validation)
    assert len(a) == len(b) == len(data.validation)
    ba, bb = collate([a[i] for i in range(len(a))]), collate([b[i] for i in range(len(b))])
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


def test_max_len_keeps_most_recent(data):
    ds = MobilityDataset(data.train, max_len=4)
    i = int(np.argmax(data.train.lengths))
    assert data.train.lengths[i] > 4
    item = ds[i]
    assert item["x"].tolist() == data.train[i]["X"][-4:].tolist()


def test_dataloader_covers_every_sample_fast(data):
    ds = MobilityDataset(data.train)
    loader = DataLoader(ds, batch_size=128, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    t0 = time.perf_counter()
    ys = torch.cat([b["y"] for b in loader])
    dt = time.perf_counter() - t0
    assert sorted(ys.tolist()) == sorted(data.train.y.tolist())
    # generous bound (a shared 2-core machine): well over 10k samples per second
    assert len(ds) / dt > 10_000
