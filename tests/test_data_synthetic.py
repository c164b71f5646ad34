"""Synthetic generator: determinism, output format, and statistics of the diy preset."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from hsoftmax.data.baselines import run_baselines
from hsoftmax.data.samples import build_samples
from hsoftmax.data.staypoints import read_locations, read_staypoints
from hsoftmax.data.synthetic import PRESETS, generate, get_preset, write_csv


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_csvs(tmp_path):
    a = write_csv(generate("small", seed=3, progress=False), tmp_path / "a")
    b = write_csv(generate("small", seed=3, progress=False), tmp_path / "b")
    c = write_csv(generate("small", seed=4, progress=False), tmp_path / "c")
    for pa, pb in zip(a, b, strict=True):
        assert pa.stat().st_size > 1000
        assert _digest(pa) == _digest(pb)
    assert _digest(a[0]) != _digest(c[0])


def test_small_output_is_valid_staypoint_data(tmp_path):
    res = generate("small", seed=0, progress=False)
    sp_path, loc_path = write_csv(res, tmp_path)
    sp = read_staypoints(sp_path)  # the generator writes what the real loader reads
    locs = read_locations(loc_path)
    cfg = get_preset("small")
    assert sp["user_id"].nunique() == cfg.n_users
    # every location is visited and every visited location has coordinates
    assert set(sp["location_id"]) == set(locs["id"])
    assert (sp["finished_at"] > sp["started_at"]).all()
    # stays of a user do not overlap
    same = sp["user_id"].to_numpy()[1:] == sp["user_id"].to_numpy()[:-1]
    gap = sp["started_at"].to_numpy()[1:] - sp["finished_at"].to_numpy()[:-1]
    assert (gap[same] >= np.timedelta64(0)).all()
    # coordinates lie within the configured region
    half_deg = cfg.region_km / 2 / 111.32
    assert (locs["lat"] - cfg.center_lat).abs().max() <= half_deg * 1.01
    assert sp["started_at"].min() >= pd.Timestamp(cfg.start_date)


def test_weekly_rhythm(tmp_path):
    sp = read_staypoints(write_csv(generate("small", seed=1, progress=False), tmp_path)[0])
    hour = sp["started_at"].dt.hour
    # people leave home in the morning and come back in the evening, rarely move at night
    assert ((hour >= 1) & (hour < 5)).mean() < 0.02
    # the user's second most visited place (work) is visited more on weekdays than on weekends
    counts = sp.groupby(["user_id", "location_id"]).size().rename("n").reset_index()
    counts = counts.sort_values(["user_id", "n"], ascending=[True, False])
    work = counts.groupby("user_id").nth(1).set_index("user_id")["location_id"]
    at_work = sp["location_id"].to_numpy() == work.reindex(sp["user_id"]).to_numpy()
    weekend = sp["started_at"].dt.day_of_week.to_numpy() >= 5
    assert at_work[~weekend].mean() > 2 * at_work[weekend].mean()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_geolife_preset_sizes():
    cfg = PRESETS["geolife"]
    res = generate("geolife", seed=0, progress=False)
    assert res.staypoints["user_id"].nunique() == cfg.n_users == 46
    data = build_samples(read_staypoints_frame(res.staypoints), split=cfg.split, progress=False)
    # vocabulary of the order of the real set's 1,187 locations
    assert 0.85 * cfg.n_locations < data.n_locations < 1.15 * cfg.n_locations


def read_staypoints_frame(df):
    from hsoftmax.data.staypoints import validate_staypoints

    return validate_staypoints(df)


# --------------------------------------------------------------------------------------------
# diy preset: generated once per session


@pytest.fixture(scope="session")
def diy(tmp_path_factory):
    res = generate("diy", seed=0, progress=False)
    d = tmp_path_factory.mktemp("diy")
    sp_path, loc_path = write_csv(res, d)
    sp = read_staypoints(sp_path)
    data = build_samples(sp, locations=read_locations(loc_path), progress=False)
    return res, sp, data


@pytest.mark.slow
def test_diy_generation_time_and_sizes(diy):
    res, sp, data = diy
    cfg = get_preset("diy")
    assert res.seconds < 60
    assert sp["user_id"].nunique() == cfg.n_users == 803
    # the MHSA filter keeps nearly all users
    assert data.n_users - 1 >= 0.9 * cfg.n_users
    # vocabulary close to the real 15,584 locations (+ padding and unseen)
    assert abs(data.n_locations - (cfg.n_locations + 2)) < 0.05 * cfg.n_locations
    n = data.info["n_samples"]
    assert 110_000 < n["train"] < 170_000
    assert 8_000 < n["validation"] < 25_000
    assert 8_000 < n["test"] < 25_000
    # about nine months
    span = sp["finished_at"].max() - sp["started_at"].min()
    assert 250 <= span.days <= 280


@pytest.mark.slow
def test_diy_visits_are_heavy_tailed(diy):
    _, sp, _ = diy
    counts = np.sort(sp["location_id"].value_counts().to_numpy())[::-1]
    mean = counts.mean()
    # far more mass in the tail than a light-tailed (exponential) distribution with the same mean:
    # P(X >= 10 mean) would be e^-10 ~ 4.5e-5 there
    assert (counts >= 10 * mean).mean() > 20 * np.exp(-10)
    assert (counts >= 20 * mean).mean() > 1e3 * np.exp(-20)
    # a few hubs, a long tail of rarely visited places
    assert counts.max() > 100 * np.median(counts)
    top10 = counts[: len(counts) // 10].sum() / counts.sum()
    assert top10 > 0.5
    # the ranked visit counts fall roughly like a power law: straight on log-log over the top ranks
    ranks = np.arange(1, len(counts) + 1)
    top = slice(0, len(counts) // 5)
    slope, _ = np.polyfit(np.log(ranks[top]), np.log(counts[top]), 1)
    assert -2.5 < slope < -0.3


@pytest.mark.slow
def test_diy_return_share(diy):
    _, sp, _ = diy
    first_visit = ~sp.duplicated(["user_id", "location_id"])
    returns = 1 - first_visit.mean()
    assert 0.6 <= returns <= 0.9


@pytest.mark.slow
def test_diy_distinct_locations_grow_sublinearly(diy):
    _, sp, _ = diy
    first_visit = (~sp.duplicated(["user_id", "location_id"])).to_numpy()
    user = sp["user_id"].to_numpy()
    n = sp.groupby("user_id").cumcount().to_numpy() + 1  # stays so far
    S = pd.Series(first_visit).groupby(user).cumsum().to_numpy()  # distinct places so far
    # pooled log-log slope of S(n) over n >= 20 (past the first days' anchors)
    m = n >= 20
    slope = np.polyfit(np.log(n[m]), np.log(S[m]), 1)[0]
    assert 0.3 < slope < 0.9
    # and for the typical user, doubling the stays adds far less than doubling the places
    at = (
        sp.assign(n=n, S=S)
        .groupby("user_id")
        .apply(
            lambda g: g["S"].iloc[len(g) // 2 - 1] / max(g["S"].iloc[-1], 1), include_groups=False
        )
    )
    assert at.median() > 0.55


@pytest.mark.slow
def test_diy_baselines_leave_headroom(diy):
    _, _, data = diy
    res = run_baselines(data.train, data.test, data.n_locations)
    best = max(res["most_frequent"]["acc@1"], res["markov"]["acc@1"])
    assert 25 <= best <= 45
    for m in res.values():
        assert m["acc@1"] <= m["acc@5"] <= m["acc@10"] <= 100
    # the data has time-dependent structure a plain Markov chain misses
    assert res["context_markov"]["acc@1"] > res["markov"]["acc@1"]
    # the history window contains the target often, but is far from sufficient on its own
    assert res["history_frequency"]["acc@10"] > res["markov"]["acc@10"]
    assert res["history_frequency"]["acc@1"] < best
