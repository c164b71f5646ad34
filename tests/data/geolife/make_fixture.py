"""Rebuild ``staypoints.csv`` and ``locations.csv`` of this folder from raw Geolife GPS fixes.

Input: the ``tests/data/geolife_long_10_MB`` folder of a trackintel checkout
(https://github.com/mie-lab/trackintel, MIT licence), which holds real Geolife trajectories
(``.plt``) of 11 users.  Run once; the outputs are committed:

    python tests/data/geolife/make_fixture.py PATH/TO/trackintel/tests/data/geolife_long_10_MB

The steps are those of trackintel 1.4, written out with numpy/pandas/scikit-learn so that
trackintel is not needed.  Parameters: trackintel's default sliding window (100 m, 5 min, so that
short non-activity stops exist; MHSA uses 200 m, 30 min) with MHSA's 24 h gap, MHSA's 25 min
activity threshold, and DBSCAN at 50 m with 2 samples (the default of MHSA's ``get_dataset``):

1. ``read_geolife``: fixes in UTC, altitude feet -> metres.
2. ``generate_staypoints(method="sliding", dist_threshold=100, time_threshold=5,
   gap_threshold=24 * 60, include_last=True)``: a stay starts at fix ``s`` and ends at the first
   fix ``c`` that is ``dist_threshold`` metres or more away from ``s``, if ``c`` is at least
   ``time_threshold`` minutes after ``s``; its point is the mean of fixes ``s..c-1``.
3. ``create_activity_flag(time_threshold=25)`` (MHSA's value): ``is_activity`` = duration > 25 min.
4. ``generate_locations(method="dbscan", epsilon=50, num_samples=2, distance_metric="haversine",
   agg_level="dataset")`` on every stay: DBSCAN noise keeps an empty ``location_id``; a location's
   center is the mean of its stays' points; one locations row per (user, location); its extent is
   a square of ``epsilon`` around the center (trackintel: the buffered convex hull).
5. ``write_staypoints_csv`` / ``write_locations_csv``: the index ``id`` first, tz-aware
   timestamps, WKT written untrimmed (16 decimals), ``location_id`` nullable (empty for noise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import DBSCAN

EARTH_M = 6_371_000.0


def read_plt(user_dir: Path, user_id: int) -> pd.DataFrame:
    frames = []
    for f in sorted((user_dir / "Trajectory").glob("*.plt")):
        df = pd.read_csv(
            f, skiprows=6, header=None, names=["lat", "lon", "zero", "alt", "days", "date", "time"]
        )
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["tracked_at"] = pd.to_datetime(df["date"] + " " + df["time"], utc=True)
    df["elevation"] = df["alt"] * 0.3048
    df["user_id"] = user_id
    return df.sort_values("tracked_at", kind="stable").reset_index(drop=True)


def haversine_m(lat1, lon1, lat2, lon2):
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_M * np.arcsin(np.sqrt(a))


def sliding_staypoints(pfs, dist=100.0, time_min=5.0, gap_min=24 * 60.0) -> list[dict]:
    t = pfs["tracked_at"]
    sec = (t - t.iloc[0]).dt.total_seconds().to_numpy()
    lat, lon = pfs["lat"].to_numpy(), pfs["lon"].to_numpy()
    out, start, curr = [], 0, 0

    def stay(s, e, last=False):
        end = len(pfs) if last else e
        return {
            "started_at": t.iloc[s],
            "finished_at": t.iloc[e],
            "lat": lat[s:end].mean(),
            "lon": lon[s:end].mean(),
            "elevation": float(np.median(pfs["elevation"].to_numpy()[s:end])),
        }

    for curr in range(1, len(pfs)):
        if sec[curr] - sec[curr - 1] > gap_min * 60:
            start = curr
            continue
        if haversine_m(lat[start], lon[start], lat[curr], lon[curr]) >= dist:
            if sec[curr] - sec[start] >= time_min * 60:
                out.append(stay(start, curr))
            start = curr
    if sec[curr] - sec[start] >= time_min * 60:
        out.append(stay(start, curr, last=True))
    return out


def wkt_point(lon, lat) -> str:
    return f"POINT ({lon:.16f} {lat:.16f})"


def extent(lon, lat, r=50 / 111_000) -> str:
    pts = [(lon - r, lat - r), (lon + r, lat - r), (lon + r, lat + r), (lon - r, lat + r)]
    pts.append(pts[0])
    return "POLYGON ((" + ", ".join(f"{x:.16f} {y:.16f}" for x, y in pts) + "))"


def main(src: str, out_dir: str) -> None:
    rows = []
    for user_dir in sorted(Path(src).iterdir()):
        if user_dir.is_dir() and user_dir.name.isdigit():
            for s in sliding_staypoints(read_plt(user_dir, int(user_dir.name))):
                rows.append({**s, "user_id": int(user_dir.name)})
    sp = pd.DataFrame(rows).sort_values(["user_id", "started_at"]).reset_index(drop=True)
    sp["is_activity"] = (sp["finished_at"] - sp["started_at"]) > pd.Timedelta(minutes=25)
    labels = DBSCAN(
        eps=50 / EARTH_M, min_samples=2, algorithm="ball_tree", metric="haversine"
    ).fit_predict(np.radians(sp[["lat", "lon"]].to_numpy()))
    sp["location_id"] = pd.array(np.where(labels >= 0, labels, -1), dtype="Int64")
    sp.loc[labels < 0, "location_id"] = pd.NA
    clustered = sp[labels >= 0]
    centers = clustered.groupby("location_id")[["lat", "lon"]].mean()
    pairs = clustered[["user_id", "location_id"]].drop_duplicates()
    pairs = pairs.sort_values(["location_id", "user_id"])
    locs = pd.DataFrame(
        {
            "id": pairs["location_id"].astype("int64").to_numpy(),
            "user_id": pairs["user_id"].to_numpy(),
            "center": [
                wkt_point(centers.loc[i, "lon"], centers.loc[i, "lat"])
                for i in pairs["location_id"]
            ],
            # trackintel: the convex hull buffered by epsilon; a square of epsilon here
            "extent": [
                extent(centers.loc[i, "lon"], centers.loc[i, "lat"]) for i in pairs["location_id"]
            ],
        }
    ).set_index("id")
    sp["geom"] = [wkt_point(x, y) for x, y in zip(sp["lon"], sp["lat"], strict=True)]
    sp.index.name = "id"
    cols = ["started_at", "finished_at", "geom", "elevation", "user_id", "location_id"]
    out = Path(out_dir)
    sp[cols + ["is_activity"]].to_csv(out / "staypoints.csv")
    locs.to_csv(out / "locations.csv")
    print(
        f"{len(sp)} staypoints ({int(sp['is_activity'].sum())} activities, "
        f"{int((labels < 0).sum())} noise), {sp['user_id'].nunique()} users, "
        f"{len(centers)} locations"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).parent))
