"""Large-vocabulary presets: the province of cities (``n_cities``), checked on small configs.

``diy-100k`` and ``diy-1m`` themselves take minutes to generate (docs/data.md); these tests read
their configuration and generate only small multi-city configs.
"""

from __future__ import annotations

import numpy as np
import pytest

from hsoftmax.data.samples import build_samples
from hsoftmax.data.staypoints import validate_staypoints
from hsoftmax.data.synthetic import PRESETS, generate, get_preset

KM_PER_DEG = 111.32


@pytest.mark.parametrize(("name", "at_least"), [("diy-100k", 100_000), ("diy-1m", 1_000_000)])
def test_large_presets_are_diy_cities(name, at_least):
    cfg, diy = get_preset(name), get_preset("diy")
    assert name in PRESETS and cfg.name == name and cfg.notes
    # each city has the diy preset's size and calibration, so its vocabulary scales with n_cities
    assert cfg.n_users == cfg.n_cities * diy.n_users
    assert cfg.n_locations == cfg.n_cities * diy.n_locations
    assert cfg.n_locations >= at_least
    changed = {
        f
        for f in cfg.__dataclass_fields__
        if f not in ("name", "notes") and getattr(cfg, f) != getattr(diy, f)
    }
    assert changed == {"n_users", "n_locations", "n_cities"}


def _km(locations, cfg) -> np.ndarray:
    y = (locations["lat"].to_numpy() - cfg.center_lat) * KM_PER_DEG
    x = (locations["lon"].to_numpy() - cfg.center_lon) * (
        KM_PER_DEG * np.cos(np.radians(cfg.center_lat))
    )
    return np.stack([x, y], axis=1)


@pytest.fixture(scope="module")
def province():
    cfg = get_preset("small").replace(name="province", n_cities=3, n_users=120, n_locations=1200)
    return cfg, generate(cfg, seed=0, progress=False)


def test_cities_are_separate_and_users_stay_in_theirs(province):
    cfg, res = province
    sp, locs = res.staypoints, res.locations
    assert sp["user_id"].nunique() == cfg.n_users
    assert np.array_equal(locs["id"].to_numpy(), np.arange(len(locs)))
    assert set(sp["location_id"]) == set(locs["id"])
    xy = _km(locs, cfg)
    # every place lies in one of n_cities squares of side region_km, city_spacing_km apart on a
    # grid centred on the preset's centre (so centres are multiples of half the spacing)
    half = cfg.city_spacing_km / 2
    city = np.round(xy / half).astype(int)
    cells = {tuple(c) for c in city}
    assert len(cells) == cfg.n_cities
    assert np.abs(xy - city * half).max() <= cfg.region_km / 2 + 0.01
    # a user's places all lie in one city
    user_city = city[sp["location_id"].to_numpy()]
    per_user = {}
    for u, c in zip(sp["user_id"].to_numpy(), map(tuple, user_city), strict=True):
        per_user.setdefault(u, set()).add(c)
    assert all(len(c) == 1 for c in per_user.values())
    # users are split evenly over the cities
    sizes = np.bincount([list(cells).index(next(iter(c))) for c in per_user.values()])
    assert sizes.max() - sizes.min() <= 1


def test_province_vocabulary_grows_with_cities(province):
    cfg, res = province
    one = generate(
        cfg.replace(n_cities=1, n_users=cfg.n_users // 3, n_locations=cfg.n_locations // 3),
        seed=0,
        progress=False,
    )
    # three independent cities of the same size visit about three times the places
    assert 2.5 * len(one.locations) < len(res.locations) < 3.5 * len(one.locations)
    data = build_samples(validate_staypoints(res.staypoints), split=cfg.split, progress=False)
    assert data.n_users - 1 >= 0.8 * cfg.n_users


def test_province_is_deterministic(province):
    cfg, res = province
    again = generate(cfg, seed=0, progress=False)
    other = generate(cfg, seed=1, progress=False)
    assert res.staypoints.equals(again.staypoints) and res.locations.equals(again.locations)
    assert not res.staypoints.equals(other.staypoints)


@pytest.mark.parametrize("n", [0, 121])
def test_bad_n_cities(n):
    cfg = get_preset("small").replace(n_cities=n, n_users=120, n_locations=1200)
    with pytest.raises(ValueError, match=rf"n_cities must be in \[1, .* = \[1, 120\], got {n}"):
        generate(cfg, progress=False)
