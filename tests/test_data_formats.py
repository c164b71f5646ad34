"""Files as trackintel and the MHSA code write them, read by :func:`hsoftmax.data.load_dir`.

The writers below are independent transcriptions of what those tools do, not calls into our
loaders:

* trackintel 1.4 (``write_staypoints_csv`` / ``write_locations_csv``): the frame's index ``id``
  as first column, tz-aware timestamps (``2021-10-03 09:44:00+07:00``), WKT geometries written
  untrimmed (16 decimals), ``location_id`` a nullable ``Int64`` whose missing values (DBSCAN
  noise) are empty cells, ``is_activity`` a bool column; locations generated with
  ``agg_level="dataset"`` hold one row per user and location, so ids repeat.
* MHSA (``preprocessing/geolife.py``, ``utils/dataloader.py`` of mie-lab/location-prediction):
  activity stays without noise, durations ``total_seconds() // 60`` (float), time features per
  user, the 0.6/0.2/0.2 per-user day split, valid targets (>= 3 history stays within 7 days),
  users kept with a target in every split and renumbered 1..N, a staypoint table
  ``dataSet_geolife.csv`` read back from CSV (so durations stay float64), location ids encoded
  with scikit-learn's ``OrdinalEncoder`` fitted on the training split + 2, and one pickle per
  split and history length ``geolife_transformer_{previous_day}_{split}.pk`` in ``data/temp``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import OrdinalEncoder

from hsoftmax.data.mhsa import load_mhsa_dir
from hsoftmax.data.samples import MobilityData, load_id_maps, save_id_maps
from hsoftmax.data.sources import load_dir, parse_split
from hsoftmax.data.staypoints import (
    DataFormatError,
    locations_to_vocabulary,
    read_locations,
    vocabulary_coordinates,
)
from hsoftmax.data.synthetic import generate

SPLIT = (0.6, 0.2, 0.2)
KEYS = ("X", "user_X", "weekday_X", "start_min_X", "dur_X", "diff")


def _wkt(lon, lat) -> str:
    # shapely's to_wkt(rounding_precision=-1, trim=False), as trackintel's writers call it
    return f"POINT ({lon:.16f} {lat:.16f})"


def _square(lon, lat, r=0.0003) -> str:
    pts = [(lon - r, lat - r), (lon + r, lat - r), (lon + r, lat + r), (lon - r, lat - r)]
    return "POLYGON ((" + ", ".join(f"{x:.16f} {y:.16f}" for x, y in pts) + "))"


@pytest.fixture(scope="module")
def trackintel_frames():
    """(staypoints, locations, clean) frames shaped as trackintel holds them.

    ``clean`` are the activity stays with a location: what must remain after the loader drops
    DBSCAN noise and non-activity stays.  Users are renumbered 101, 103, ... so that encoded and
    original user ids differ.
    """
    res = generate("small", seed=0, progress=False)
    sp = res.staypoints[res.staypoints["user_id"] < 12].copy()
    loc_xy = res.locations.set_index("id")
    rng = np.random.default_rng(7)
    sp["user_id"] = 101 + 2 * sp["user_id"]
    sp["location_id"] = sp["location_id"] * 3 + 10  # original ids far from 0..V
    sp["started_at"] = pd.to_datetime(sp["started_at"])
    sp["finished_at"] = pd.to_datetime(sp["finished_at"])
    sp["is_activity"] = True
    clean = sp.copy()
    n = len(sp)
    # noise: stays DBSCAN left unassigned; non-activity: short stops that got a location
    extra = sp.sample(n=n // 8, random_state=1).copy()
    extra["started_at"] = extra["finished_at"] + pd.Timedelta(minutes=3)
    extra["finished_at"] = extra["started_at"] + pd.Timedelta(minutes=4)
    kind = rng.random(len(extra)) < 0.5
    extra["location_id"] = extra["location_id"].astype("Int64")
    extra.loc[kind, "location_id"] = pd.NA
    extra.loc[~kind, "is_activity"] = False
    full = pd.concat([sp.assign(location_id=sp["location_id"].astype("Int64")), extra])
    full = full.sort_values(["user_id", "started_at"], kind="stable")
    orig_loc = ((full["location_id"].fillna(10).astype(int) - 10) // 3).to_numpy()
    lat = loc_xy.loc[orig_loc, "lat"].to_numpy() + rng.normal(0, 1e-4, len(full))
    lon = loc_xy.loc[orig_loc, "lon"].to_numpy() + rng.normal(0, 1e-4, len(full))
    full["geom"] = [_wkt(x, y) for x, y in zip(lon, lat, strict=True)]
    full["elevation"] = rng.normal(100, 5, len(full))
    full = full.reset_index(drop=True)
    full.index.name = "id"
    full = full[
        ["started_at", "finished_at", "geom", "elevation", "user_id", "location_id", "is_activity"]
    ]
    # dataset-level locations: a row per (user, location), the same center for every user
    pairs = clean[["user_id", "location_id"]].drop_duplicates().sort_values("location_id")
    o = (pairs["location_id"].to_numpy() - 10) // 3
    xs, ys = loc_xy.loc[o, "lon"].to_numpy(), loc_xy.loc[o, "lat"].to_numpy()
    locs = pd.DataFrame(
        {
            "id": pairs["location_id"].to_numpy(),
            "user_id": pairs["user_id"].to_numpy(),
            "center": [_wkt(x, y) for x, y in zip(xs, ys, strict=True)],
            "extent": [_square(x, y) for x, y in zip(xs, ys, strict=True)],
        }
    ).set_index("id")
    return full, locs, clean


def _write_trackintel(full, locs, d):
    d.mkdir(parents=True, exist_ok=True)
    full.to_csv(d / "staypoints.csv", index=True)
    locs.to_csv(d / "locations.csv", index=True)
    return d


# ------------------------------------------------------------------ MHSA's pipeline, transcribed


def _valid_ids(df: pd.DataFrame, previous_day: int) -> list:
    out = []
    for _, u in df.groupby("user_id"):
        u = u.reset_index(drop=True)
        first = u["start_day"].min()
        for i, row in u.iterrows():
            if row["start_day"] - first < previous_day:
                continue
            hist = u.iloc[:i]
            if (hist["start_day"] >= row["start_day"] - previous_day).sum() >= 3:
                out.append(row["id"])
    return out


def _split(df: pd.DataFrame, split) -> list[pd.DataFrame]:
    parts = []
    for _, u in df.groupby("user_id"):
        m = u["start_day"].max()
        k = np.where(
            u["start_day"] < m * split[0], 0, np.where(u["start_day"] < m * sum(split[:2]), 1, 2)
        )
        parts.append(u.assign(_k=k))
    df = pd.concat(parts)
    return [df[df["_k"] == k].drop(columns="_k").copy() for k in range(3)]


def mhsa_preprocess(full, locs, data_dir, previous_days=(7, 14), split=SPLIT):
    """Write ``dataSet_geolife.csv``, ``locations_geolife.csv`` and the pickles of every
    ``previous_day`` as MHSA does; return the fitted OrdinalEncoder and the user renumbering."""
    sp = full[full["is_activity"]].copy()
    sp = sp[~sp["location_id"].isna()].copy()
    sp["duration"] = (sp["finished_at"] - sp["started_at"]).dt.total_seconds() // 60
    timed = []
    for _, u in sp.groupby("user_id"):
        min_day = pd.to_datetime(u["started_at"].min().date())
        start = u["started_at"].dt.tz_localize(None)
        timed.append(
            u.assign(
                start_day=(start - min_day).dt.days,
                start_min=start.dt.hour * 60 + start.dt.minute,
                weekday=start.dt.day_of_week,
            )
        )
    sp = pd.concat(timed).sort_values(["user_id", "start_day", "start_min"])
    sp = sp.drop(columns=["started_at", "finished_at", "geom", "elevation", "is_activity"])
    sp["location_id"] = sp["location_id"].astype(int)
    sp = sp.reset_index(drop=True).rename_axis("id").reset_index()
    train, vali, test = _split(sp, split)
    valid = set(_valid_ids(train, 7) + _valid_ids(vali, 7) + _valid_ids(test, 7))
    users = [set(p.loc[p["id"].isin(valid), "user_id"]) for p in (train, vali, test)]
    keep = sorted(set.intersection(*users))
    sp = sp[sp["user_id"].isin(keep)].copy()
    user_map = {u: i + 1 for i, u in enumerate(keep)}
    sp["user_id"] = sp["user_id"].map(user_map)
    data_dir.mkdir(parents=True, exist_ok=True)
    sp.to_csv(data_dir / "dataSet_geolife.csv", index=False)
    used = locs[locs.index.isin(sp["location_id"].unique())]
    used[~used.index.duplicated(keep="first")].to_csv(data_dir / "locations_geolife.csv")

    # utils/dataloader.py
    ori = pd.read_csv(data_dir / "dataSet_geolife.csv")
    ori = ori.sort_values(["user_id", "start_day", "start_min"])
    ori.loc[ori["duration"] > 60 * 24 * 2 - 1, "duration"] = 60 * 24 * 2 - 1
    parts = _split(ori, split)
    enc = OrdinalEncoder(dtype=np.int64, handle_unknown="use_encoded_value", unknown_value=-1)
    enc.fit(parts[0]["location_id"].values.reshape(-1, 1))
    for p in parts:
        p["location_id"] = enc.transform(p["location_id"].values.reshape(-1, 1)) + 2
    (data_dir / "temp").mkdir(exist_ok=True)
    for pd_ in previous_days:
        for name, p in zip(("train", "validation", "test"), parts, strict=True):
            records = []
            for _, u in p.groupby("user_id"):
                u = u.reset_index(drop=True)
                u["diff_day"] = u["start_day"] - u["start_day"].min()
                for i, row in u.iterrows():
                    if row["diff_day"] < pd_ or row["id"] not in valid:
                        continue
                    hist = u.iloc[:i]
                    hist = hist.loc[hist["start_day"] >= row["start_day"] - pd_]
                    records.append(
                        {
                            "X": hist["location_id"].values,
                            "user_X": hist["user_id"].values,
                            "weekday_X": hist["weekday"].values,
                            "start_min_X": hist["start_min"].values,
                            "dur_X": hist["duration"].values,
                            "diff": (row["diff_day"] - hist["diff_day"]).astype(int).values,
                            "Y": int(row["location_id"]),
                        }
                    )
            path = data_dir / "temp" / f"geolife_transformer_{pd_}_{name}.pk"
            with open(path, "wb") as f:
                pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
    return enc, user_map


@pytest.fixture(scope="module")
def mhsa_dir(trackintel_frames, tmp_path_factory):
    full, locs, _ = trackintel_frames
    d = tmp_path_factory.mktemp("mhsa") / "data"
    enc, user_map = mhsa_preprocess(full, locs, d)
    return d, enc, user_map


# ------------------------------------------------------------------------------------ trackintel


def test_trackintel_dir_drops_noise_and_non_activity(trackintel_frames, tmp_path, caplog):
    full, locs, clean = trackintel_frames
    d = _write_trackintel(full, locs, tmp_path / "ti")
    text = (d / "staypoints.csv").read_text().splitlines()
    assert text[0].startswith("id,started_at,finished_at,geom")
    assert "+07:00" in text[1] and ",," in "\n".join(text)  # tz-aware, empty location_id
    with caplog.at_level(logging.INFO, logger="hsoftmax.data"):
        data = load_dir(d, previous_day=7, split="0.6,0.2,0.2", progress=False)
    n_noise = int(full["location_id"].isna().sum())
    n_inactive = int((~full["is_activity"] & full["location_id"].notna()).sum())
    lines = [r.getMessage() for r in caplog.records if "DBSCAN noise" in r.getMessage()]
    assert len(lines) == 1
    assert (
        f"dropped {n_noise + n_inactive} of {len(full)} stays: {n_noise} DBSCAN noise "
        f"(empty location_id), {n_inactive} more not activities" in lines[0]
    )
    # the same samples as from the clean stays alone, written as a plain CSV
    plain = tmp_path / "plain"
    plain.mkdir()
    c = clean.copy()
    c["started_at"] = c["started_at"].dt.strftime("%Y-%m-%dT%H:%M:%S%z")
    c["finished_at"] = c["finished_at"].dt.strftime("%Y-%m-%dT%H:%M:%S%z")
    c[["user_id", "location_id", "started_at", "finished_at"]].to_csv(
        plain / "staypoints.csv", index=False
    )
    ref = load_dir(plain, previous_day=7, split=SPLIT, progress=False)
    for name in ("train", "validation", "test"):
        a, b = data.splits[name], ref.splits[name]
        assert len(a) == len(b) > 0
        for i in range(0, len(a), 37):
            for k, v in a[i].items():
                np.testing.assert_array_equal(v, b[i][k])
    assert data.path == str(d.resolve())
    assert data.info["split"] == list(SPLIT) and data.info["previous_day"] == 7


def test_trackintel_ids_and_coordinates(trackintel_frames, tmp_path):
    full, locs, clean = trackintel_frames
    d = _write_trackintel(full, locs, tmp_path / "ti")
    data = load_dir(d, previous_day=7, split=SPLIT, progress=False)
    # encoded location k >= 2 is the (k-2)-th smallest original id among the training stays
    s = data.train
    users_orig = data.user_ids[s.user]
    assert set(users_orig) <= set(clean["user_id"]) and data.user_ids[0] == -1
    assert np.all(data.user_ids[1:] > 100)  # originals (101, 103, ...), not 1..N
    orig = data.location_ids[s.loc]
    assert np.all(orig >= 10) and np.all((orig - 10) % 3 == 0)
    assert np.all(np.diff(data.location_ids[2:]) > 0)
    # each (user, original location) of a training history is a stay of that user in the input
    pairs = set(zip(clean["user_id"], clean["location_id"], strict=True))
    assert all((u, loc) in pairs for u, loc in zip(users_orig, orig, strict=True))
    # coordinates: each encoded id gets the center of its original id in locations.csv
    assert data.has_coordinates
    xy = data.coordinates()
    assert xy.shape == (data.n_locations, 2)
    first = locs[~locs.index.duplicated()]
    centers = first["center"].str.extract(r"POINT \(([-0-9.]+) ([-0-9.]+)\)").astype(float)
    for k in (2, data.n_locations // 2, data.n_locations - 1):
        lon, lat = centers.loc[data.location_ids[k]]
        assert xy[k] == pytest.approx([lat, lon])
    # padding and unseen sit at the mean of the known locations
    np.testing.assert_allclose(xy[0], xy[2:].mean(0))
    np.testing.assert_allclose(xy[1], xy[2:].mean(0))


def test_trackintel_locations_with_repeated_ids(trackintel_frames, tmp_path):
    _, locs, _ = trackintel_frames
    assert locs.index.duplicated().any()  # dataset-level locations repeat ids across users
    locs.to_csv(tmp_path / "locations.csv", index=True)
    table = read_locations(tmp_path / "locations.csv")
    assert table["id"].is_unique and len(table) == locs.index.nunique()


def test_saved_data_keeps_maps_and_path(trackintel_frames, tmp_path):
    full, locs, _ = trackintel_frames
    d = _write_trackintel(full, locs, tmp_path / "ti")
    data = load_dir(d, previous_day=7, split=SPLIT, progress=False)
    data.save(tmp_path / "cache")
    back = MobilityData.load(tmp_path / "cache")
    np.testing.assert_array_equal(back.location_ids, data.location_ids)
    np.testing.assert_array_equal(back.user_ids, data.user_ids)
    assert back.path == data.path and back.has_coordinates
    # the directory `hsoftmax data samples` writes reads back with both maps
    data.write_mhsa(tmp_path / "out", prefix="")
    again = load_dir(tmp_path / "out", progress=False)
    np.testing.assert_array_equal(again.location_ids, data.location_ids)
    np.testing.assert_array_equal(again.user_ids, data.user_ids)
    assert again.info["original_user_ids"] and again.info["original_location_ids"]
    np.testing.assert_allclose(again.coordinates(), data.coordinates())
    # the id maps alone, as a run directory keeps them
    save_id_maps(data, tmp_path / "run")
    loc_ids, user_ids, table = load_id_maps(tmp_path / "run", data.n_locations)
    np.testing.assert_array_equal(loc_ids[2:], data.location_ids[2:])
    np.testing.assert_array_equal(user_ids, data.user_ids)
    # a trackintel locations.csv matched to the vocabulary gives the same features
    vocab = locations_to_vocabulary(read_locations(d / "locations.csv"), loc_ids)
    np.testing.assert_allclose(vocabulary_coordinates(vocab, len(loc_ids)), data.coordinates())


# ------------------------------------------------------------------------------------------ MHSA


def _pickle(d, name):
    with open(d / "temp" / name, "rb") as f:
        return pickle.load(f)


def test_mhsa_pickles_as_written_load(mhsa_dir):
    d, enc, user_map = mhsa_dir
    raw = _pickle(d, "geolife_transformer_7_train.pk")
    assert raw[0]["dur_X"].dtype == np.float64  # what MHSA writes
    data = load_dir(d / "temp", previous_day=7, progress=False)
    assert data.info["variant"] == "geolife_transformer_7" and data.info["previous_day"] == 7
    for name in ("train", "validation", "test"):
        raw = _pickle(d, f"geolife_transformer_7_{name}.pk")
        s = data.splits[name]
        assert len(s) == len(raw) > 0
        for i in range(0, len(raw), 11):
            for k in KEYS:
                np.testing.assert_array_equal(s[i][k], raw[i][k].astype(np.int64))
            assert s[i]["Y"] == raw[i]["Y"]
    # the vocabulary and the map back: OrdinalEncoder's sorted categories, shifted by 2
    cats = enc.categories_[0]
    assert data.n_locations == len(cats) + 2
    np.testing.assert_array_equal(data.location_ids[2:], cats)
    assert data.info["original_location_ids"] and not data.info["original_user_ids"]
    assert data.n_users == len(user_map) + 1


def test_mhsa_coordinates_matched_by_original_id(mhsa_dir, trackintel_frames):
    d, enc, _ = mhsa_dir
    _, locs, _ = trackintel_frames
    data = load_dir(d, previous_day=14, progress=False)  # MHSA's data/ folder: reads data/temp
    assert data.path == str((d / "temp").resolve())
    assert data.info["variant"] == "geolife_transformer_14"
    assert data.has_coordinates and "matched by original location id" in data.info["coordinates"]
    first = locs[~locs.index.duplicated()]
    centers = first["center"].str.extract(r"POINT \(([-0-9.]+) ([-0-9.]+)\)").astype(float)
    xy = data.coordinates()
    for k, orig in enumerate(enc.categories_[0], start=2):
        lon, lat = centers.loc[orig]
        assert xy[k] == pytest.approx([lat, lon])


def test_mhsa_variants_need_previous_day(mhsa_dir):
    d, _, _ = mhsa_dir
    with pytest.raises(
        DataFormatError,
        match=r"2 MHSA sample sets found: geolife_transformer_14 \(previous_day 14\), "
        r"geolife_transformer_7 \(previous_day 7\); choose one with data.previous_day",
    ):
        load_dir(d / "temp", progress=False)
    with pytest.raises(
        DataFormatError,
        match=r"no MHSA sample set with previous_day=3; found: geolife_transformer_14 "
        r"\(previous_day 14\), geolife_transformer_7 \(previous_day 7\)",
    ):
        load_dir(d / "temp", previous_day=3, progress=False)


def _copy_temp(d, dst, names=None):
    dst.mkdir(parents=True)
    for p in (d / "temp").iterdir():
        if names is None or p.name in names:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_mhsa_without_table_no_coordinates(mhsa_dir, tmp_path, caplog):
    # pickles and MHSA's locations_geolife.csv only: it lists every location of the kept and
    # dropped users, not just the training ones, so the encoding cannot be matched
    d, enc, _ = mhsa_dir
    dst = _copy_temp(d, tmp_path / "pk")
    (dst / "locations_geolife.csv").write_bytes((d / "locations_geolife.csv").read_bytes())
    n_file = len(read_locations(dst / "locations_geolife.csv"))
    assert n_file != len(enc.categories_[0])
    with caplog.at_level(logging.INFO, logger="hsoftmax.data"):
        data = load_dir(dst, previous_day=7, progress=False)
    assert not data.has_coordinates
    assert "no vocab_locations.csv and no dataSet_geolife.csv" in data.info["coordinates"]
    assert any("no location coordinates" in r.getMessage() for r in caplog.records)
    assert not data.info["original_location_ids"]
    with pytest.raises(DataFormatError, match=r"no location has coordinates"):
        data.coordinates()


def test_mhsa_locations_of_training_only_matched_by_rank(mhsa_dir, trackintel_frames, tmp_path):
    # a locations.csv that lists exactly the training locations: rank matching (warned)
    d, enc, _ = mhsa_dir
    _, locs, _ = trackintel_frames
    dst = _copy_temp(d, tmp_path / "pk")
    locs[locs.index.isin(enc.categories_[0])].to_csv(dst / "locations.csv")
    data = load_mhsa_dir(dst, previous_day=7)
    assert data.has_coordinates and "assumed encoding" in data.info["coordinates"]
    np.testing.assert_array_equal(data.location_ids[2:], enc.categories_[0])


def test_mhsa_table_with_other_split_is_refused(mhsa_dir, tmp_path):
    d, _, _ = mhsa_dir
    with pytest.raises(DataFormatError, match=r"dataSet_geolife\.csv: does not match the pickles"):
        load_dir(d / "temp", previous_day=7, split=(0.8, 0.1, 0.1), progress=False)


def test_parse_split():
    assert parse_split("0.6,0.2,0.2") == (0.6, 0.2, 0.2)
    assert parse_split([0.8, 0.1, 0.1]) == (0.8, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"split must be three numbers like 0.6,0.2,0.2"):
        parse_split("a,b,c")
    with pytest.raises(ValueError, match=r"three positive ratios summing to 1, got '0.5,0.5'"):
        parse_split("0.5,0.5")


def test_mhsa_pickles_equal_our_samples_from_the_same_staypoints(
    mhsa_dir, trackintel_frames, tmp_path
):
    # MHSA's pipeline and ours, from the same trackintel files, give the same samples
    d, _, user_map = mhsa_dir
    full, locs, _ = trackintel_frames
    ours = load_dir(_write_trackintel(full, locs, tmp_path / "ti"), previous_day=7, split=SPLIT)
    theirs = load_dir(d / "temp", previous_day=7)
    np.testing.assert_array_equal(ours.location_ids, theirs.location_ids)
    to_mhsa_user = np.array([-1] + [user_map[u] for u in ours.user_ids[1:]])
    for name in ("train", "validation", "test"):
        a, b = ours.splits[name], theirs.splits[name]
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(to_mhsa_user[a.sample_user], b.sample_user)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        for k in ("X", "dur_X", "diff", "start_min_X", "weekday_X"):
            np.testing.assert_array_equal(
                np.concatenate([a[i][k] for i in range(len(a))]),
                np.concatenate([b[i][k] for i in range(len(b))]),
            )


# ------------------------------------------------------- real Geolife data (see tests/data/geolife)

GEOLIFE = Path(__file__).parent / "data" / "geolife"


def test_real_geolife_staypoints(caplog):
    raw = pd.read_csv(GEOLIFE / "staypoints.csv")
    n_noise = int(raw["location_id"].isna().sum())
    n_inactive = int((~raw["is_activity"] & raw["location_id"].notna()).sum())
    assert n_noise > 0 and n_inactive > 0
    with caplog.at_level(logging.INFO, logger="hsoftmax.data"):
        data = load_dir(GEOLIFE, previous_day=1, split="0.4,0.3,0.3", progress=False)
    assert any(
        f"{n_noise} DBSCAN noise (empty location_id), {n_inactive} more not activities"
        in r.getMessage()
        for r in caplog.records
    )
    assert all(len(s) > 0 for s in data.splits.values())
    assert set(data.user_ids[1:]) <= set(raw["user_id"]) and data.n_users > 2
    # every history stay is an activity stay of that user at that original location
    kept = raw[raw["is_activity"] & raw["location_id"].notna()]
    pairs = set(zip(kept["user_id"], kept["location_id"].astype(int), strict=True))
    s = data.train
    for u, loc in zip(data.user_ids[s.user], data.location_ids[s.loc], strict=True):
        assert (u, loc) in pairs
    # coordinates: the WKT center of each location's original id
    centers = pd.read_csv(GEOLIFE / "locations.csv").drop_duplicates("id").set_index("id")
    lonlat = centers["center"].str.extract(r"POINT \(([-0-9.]+) ([-0-9.]+)\)").astype(float)
    xy = data.coordinates()
    for k in range(2, data.n_locations):
        lon, lat = lonlat.loc[data.location_ids[k]]
        assert xy[k] == pytest.approx([lat, lon])


def test_real_geolife_too_short_for_a_week_of_history():
    with pytest.raises(
        DataFormatError,
        match=r"staypoints\.csv: no user has samples in all three splits \(previous_day=7, "
        r"min_history=3, split=\(0\.6, 0\.2, 0\.2\)\)",
    ):
        load_dir(GEOLIFE, previous_day=7, split="0.6,0.2,0.2", progress=False)


class _Point:
    """Stands in for a shapely Point of a trackintel GeoDataFrame (``.x`` lon, ``.y`` lat)."""

    def __init__(self, wkt: str):
        self.x, self.y = (float(v) for v in wkt[wkt.index("(") + 1 : -1].split())


def test_trackintel_frame_in_memory_equals_its_csv(trackintel_frames, tmp_path):
    from hsoftmax.data.staypoints import read_staypoints, validate_staypoints

    full, locs, _ = trackintel_frames
    d = _write_trackintel(full, locs, tmp_path / "ti")
    frame = full.assign(geom=[_Point(w) for w in full["geom"]])  # tz-aware, Int64, bool as held
    a = validate_staypoints(frame, source="frame")
    b = read_staypoints(d / "staypoints.csv")
    pd.testing.assert_frame_equal(a, b)
    bad = frame.assign(user_id=frame["user_id"].astype(float))
    bad.loc[bad.index[3], "user_id"] = 1.5
    with pytest.raises(
        DataFormatError, match=r"frame: column 'user_id' must hold integers; .*1\.5"
    ):
        validate_staypoints(bad, source="frame")


def test_load_dir_refuses_unknown_options_before_reading(tmp_path):
    # checked before the directory is read: a typo must not pass silently on the MHSA path,
    # where the staypoint options are not used
    (tmp_path / "x_train.pk").write_bytes(b"not read")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['min_histroy'\]"):
        load_dir(tmp_path, min_histroy=3)
