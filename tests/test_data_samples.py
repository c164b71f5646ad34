"""MHSA sample building: protocol, no leakage, encoding, pickle round-trip, preset cache."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from hsoftmax.data import samples as samples_mod
from hsoftmax.data.samples import (
    MHSA_KEYS,
    SampleSet,
    build_samples,
    load_mhsa,
    load_preset,
    save_mhsa,
)
from hsoftmax.data.staypoints import add_time_features, validate_staypoints
from hsoftmax.data.synthetic import generate


@pytest.fixture(scope="module")
def small_sp():
    """Validated staypoints of the first 15 users of the small preset."""
    sp = generate("small", seed=0, progress=False).staypoints
    sp = sp[sp["user_id"] < 15].reset_index(drop=True)
    return validate_staypoints(sp)


def _naive_samples(sp: pd.DataFrame, split, previous_day, min_history=3):
    """Straight loop transcription of the MHSA preprocessing (raw ids), for comparison."""
    sp = add_time_features(sp.copy())
    out = {0: [], 1: [], 2: []}
    for user, df in sp.groupby("user_id"):
        m = df["start_day"].max()
        part = np.where(
            df["start_day"] < m * split[0],
            0,
            np.where(df["start_day"] < m * (split[0] + split[1]), 1, 2),
        )
        per_split = {}
        for k in range(3):
            d = df[part == k].reset_index(drop=True)
            found = []
            for i in range(len(d)):
                row = d.iloc[i]
                if row["start_day"] - d["start_day"].min() < previous_day:
                    continue
                hist = d.iloc[:i]
                hist = hist[hist["start_day"] >= row["start_day"] - previous_day]
                if len(hist) < min_history:
                    continue
                found.append(
                    (
                        user,
                        tuple(hist["location_id"]),
                        tuple(row["start_day"] - hist["start_day"]),
                        tuple(hist["start_min"]),
                        tuple(hist["duration"]),
                        tuple(hist["weekday"]),
                        int(row["location_id"]),
                    )
                )
            per_split[k] = found
        if all(per_split[k] for k in range(3)):  # users need samples in every split
            for k in range(3):
                out[k].extend(per_split[k])
    return out


def _as_raw(data, s: SampleSet):
    """Our samples with original ids (unseen ids cannot be mapped back: kept as None)."""
    rows = []
    for i in range(len(s)):
        d = s[i]
        orig = data.location_ids
        rows.append(
            (
                int(data.user_ids[d["user_X"][0]]),
                tuple(int(orig[x]) if x >= 2 else None for x in d["X"]),
                tuple(int(v) for v in d["diff"]),
                tuple(int(v) for v in d["start_min_X"]),
                tuple(int(v) for v in d["dur_X"]),
                tuple(int(v) for v in d["weekday_X"]),
                int(orig[d["Y"]]) if d["Y"] >= 2 else None,
            )
        )
    return rows


@pytest.mark.parametrize("split,previous_day", [((0.8, 0.1, 0.1), 7), ((0.6, 0.2, 0.2), 3)])
def test_matches_naive_mhsa_loop(small_sp, split, previous_day):
    data = build_samples(small_sp, split=split, previous_day=previous_day, progress=False)
    ref = _naive_samples(small_sp, split, previous_day)
    train_ids = {r[6] for r in ref[0]} | {x for r in ref[0] for x in r[1]}
    for k, name in enumerate(("train", "validation", "test")):
        ours = _as_raw(data, data.splits[name])
        assert len(ours) == len(ref[k]) > 0
        # ids unseen in training map to 1 and cannot be compared by value
        expect = [
            r[:1]
            + (tuple(x if x in train_ids else None for x in r[1]),)
            + r[2:6]
            + (r[6] if r[6] in train_ids else None,)
            for r in ref[k]
        ]
        assert sorted(ours, key=repr) == sorted(expect, key=repr)


def test_no_leak_between_splits(small_sp):
    data = build_samples(small_sp, progress=False)
    sp = add_time_features(small_sp.copy())
    user_max = sp.groupby("user_id")["start_day"].max()
    for k, (name, s) in enumerate(data.splits.items()):
        lo_r, hi_r = [(0.0, 0.8), (0.8, 0.9), (0.9, 1.01)][k]
        for i in range(len(s)):
            a, b = s.hist_start[i], s.hist_end[i]
            assert b - a >= 3
            users = s.user[a:b]
            assert (users == users[0]).all()
            m = user_max[int(data.user_ids[users[0]])]
            days = np.append(s.day[a:b], s.target_day[i])
            # history and target days lie in this user's split window
            assert (days >= lo_r * m).all() and (days < hi_r * m).all(), name
            diff = s.target_day[i] - s.day[a:b]
            assert ((diff >= 0) & (diff <= 7)).all()
            assert (np.diff(s.day[a:b]) >= 0).all()


def test_location_encoding_fit_on_train_only(small_sp):
    data = build_samples(small_sp, progress=False)
    V = data.n_locations
    train_ids = np.unique(np.append(data.train.loc, data.train.y))
    # training uses exactly the ids 2..V-1; 0 (padding) and 1 (unseen) never appear in train
    assert train_ids.min() == 2 and train_ids.max() == V - 1
    assert len(train_ids) == V - 2
    assert (data.location_ids[2:] == np.sort(data.location_ids[2:])).all()
    assert list(data.locations["loc"]) == list(range(2, V))
    for s in (data.validation, data.test):
        assert (s.y >= 1).all() and (s.loc >= 1).all()
    # users are 1..N
    for s in data.splits.values():
        assert s.user.min() >= 1 and s.user.max() == data.n_users - 1


def test_unseen_locations_become_1():
    # one user, 40 days; location 99 only appears at the very end (test split)
    rows = []
    for d in range(40):
        base = pd.Timestamp("2022-01-03") + pd.Timedelta(days=d)
        for h, loc in ((8, 1), (12, 2), (18, 3)):
            loc = 99 if (d == 39 and h == 18) else loc
            rows.append((7, loc, base + pd.Timedelta(hours=h), base + pd.Timedelta(hours=h + 2)))
    df = pd.DataFrame(rows, columns=["user_id", "location_id", "started_at", "finished_at"])
    data = build_samples(validate_staypoints(df), split=(0.6, 0.2, 0.2), progress=False)
    assert data.n_locations == 3 + 2
    assert data.test.y[-1] == 1
    assert (data.train.y >= 2).all()


def test_dropped_users_are_logged(small_sp, caplog):
    # a user tracked for only two days cannot have samples in every split
    extra = pd.DataFrame(
        {
            "user_id": [999] * 4,
            "location_id": [1, 2, 1, 2],
            "started_at": pd.to_datetime(["2021-10-04 08:00", "2021-10-04 18:00"] * 2)
            + pd.to_timedelta([0, 0, 1, 1], unit="D"),
        }
    )
    extra["finished_at"] = extra["started_at"] + pd.Timedelta(hours=2)
    sp = validate_staypoints(pd.concat([small_sp.drop(columns="row"), extra]))
    with caplog.at_level(logging.WARNING, logger="hsoftmax.data"):
        data = build_samples(sp, progress=False)
    msg = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(msg) == 1
    n_in = sp["user_id"].nunique()
    n_drop = n_in - (data.n_users - 1)
    assert n_drop >= 1
    assert f"dropped {n_drop} of {n_in} users" in msg[0]
    assert 999 not in set(data.user_ids)


def test_mhsa_pickle_round_trip(small_sp, tmp_path):
    data = build_samples(small_sp, progress=False)
    s = data.test
    path = tmp_path / "test.pk"
    save_mhsa(s, path)
    loaded = load_mhsa(path, n_locations=data.n_locations)
    assert isinstance(loaded, list) and len(loaded) == len(s)
    for a, b in zip(loaded, s.to_mhsa(), strict=True):
        assert set(a) == set(MHSA_KEYS)
        for k in MHSA_KEYS[:-1]:
            assert a[k].dtype == np.int64
            np.testing.assert_array_equal(a[k], b[k])
        assert a["Y"] == b["Y"] and isinstance(a["Y"], int)
    # list -> SampleSet -> list is lossless, and re-saving gives the same samples
    again = SampleSet.from_mhsa(loaded, source=str(path))
    save_mhsa(again, tmp_path / "again.pk")
    for a, b in zip(load_mhsa(tmp_path / "again.pk"), loaded, strict=True):
        for k in MHSA_KEYS[:-1]:
            np.testing.assert_array_equal(a[k], b[k])
        assert a["Y"] == b["Y"]


def test_write_mhsa_dir(small_sp, tmp_path):
    data = build_samples(small_sp, progress=False)
    paths = data.write_mhsa(tmp_path, prefix="x_")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "x_train.pk",
            "x_validation.pk",
            "x_test.pk",
            "x_vocab_locations.csv",
            "x_vocab_users.csv",
            "x_meta.json",
        ]
    )
    assert len(load_mhsa(tmp_path / "x_train.pk", data.n_locations)) == len(data.train)


def test_load_preset_generates_once_and_caches(tmp_path, monkeypatch):
    a = load_preset("small", seed=0, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "small-seed0" / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["small-seed0"]  # no temp dirs left behind

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    import hsoftmax.data.synthetic as synth

    monkeypatch.setattr(synth, "synthesize_to_dir", boom)
    b = load_preset("small", seed=0, cache_dir=tmp_path, progress=False)
    assert a.n_locations == b.n_locations and a.n_users == b.n_users
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(a.splits[name].y, b.splits[name].y)
        np.testing.assert_array_equal(a.splits[name].hist_start, b.splits[name].hist_start)
    # the locations table has coordinates for every encoded id
    assert len(b.locations) == b.n_locations - 2
    assert b.locations[["lat", "lon"]].notna().all().all()
    assert b.info["preset"] == "small" and b.info["generation_seconds"] >= 0


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HSOFTMAX_CACHE", str(tmp_path))
    assert samples_mod.default_cache_dir() == tmp_path / "data"


def test_bad_split_arguments(small_sp):
    with pytest.raises(ValueError, match="split"):
        build_samples(small_sp, split=(0.8, 0.3, 0.1), progress=False)
