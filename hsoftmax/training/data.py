"""The data a ``data`` config section names: a synthetic preset or a directory of real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hsoftmax.data import DataFormatError, MobilityData

__all__ = ["load_data"]


def load_data(data_cfg: dict, progress: bool = True) -> MobilityData:
    """The samples named by a ``data`` config section: ``path`` (MHSA pickles or staypoints) or
    the synthetic ``preset``."""
    from hsoftmax.data import load_preset

    if data_cfg.get("path"):
        return _load_dir(Path(data_cfg["path"]), progress)
    return load_preset(
        data_cfg["preset"],
        seed=data_cfg["seed"],
        cache_dir=data_cfg["cache_dir"],
        progress=progress,
    )


def _load_dir(d: Path, progress: bool) -> MobilityData:
    from hsoftmax.data import build_samples, load_mhsa, read_locations, read_staypoints

    if not d.is_dir():
        raise FileNotFoundError(f"data.path {d} is not a directory")
    if (d / "staypoints.csv").is_file():
        sp = read_staypoints(d / "staypoints.csv")
        locs = read_locations(d / "locations.csv") if (d / "locations.csv").is_file() else None
        return build_samples(
            sp, locations=locs, source=str(d / "staypoints.csv"), progress=progress
        )
    found = {}
    for split, pattern in (
        ("train", "*train*.pk"),
        ("validation", "*valid*.pk"),
        ("test", "*test*.pk"),
    ):
        hits = sorted(d.glob(pattern))
        if len(hits) != 1:
            raise FileNotFoundError(
                f"{d}: expected exactly one {pattern} MHSA pickle (or a staypoints.csv), "
                f"found {[h.name for h in hits]}"
            )
        found[split] = hits[0]
    metas = sorted(d.glob("*meta.json"))
    n_loc = None
    if metas:
        try:
            meta = json.loads(metas[0].read_text())
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{metas[0]}: not valid JSON ({e})") from None
        n_loc = meta.get("n_locations") if isinstance(meta, dict) else None
        if isinstance(n_loc, bool) or not isinstance(n_loc, int) or n_loc < 2:
            raise DataFormatError(
                f"{metas[0]}: needs an integer n_locations >= 2 (the vocabulary size, padding "
                f"id 0 included), got {n_loc!r}"
            )
    sets = {k: load_mhsa(p, n_loc, as_sampleset=True) for k, p in found.items()}
    for split, samples in sets.items():
        if len(samples.y) == 0:
            raise DataFormatError(f"{found[split]}: holds no samples")
    if n_loc is None:
        n_loc = 1 + max(int(max(s.loc.max(), s.y.max())) for s in sets.values())
    n_users = 1 + max(int(s.user.max()) for s in sets.values())
    vocab = sorted(d.glob("*vocab_locations.csv"))
    locations = pd.DataFrame(columns=["loc", "id", "lat", "lon"])
    if vocab:
        locations = pd.read_csv(vocab[0])
        missing = {"loc", "lat", "lon"} - set(locations.columns)
        if missing:
            raise DataFormatError(
                f"{vocab[0]}: missing column(s) {sorted(missing)} (needs loc, lat, lon)"
            )
        loc = pd.to_numeric(locations["loc"], errors="coerce")
        bad = ~(loc.notna() & (loc == loc.round()) & (loc >= 0) & (loc < n_loc))
        if bool(bad.any()):
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFormatError(
                f"{vocab[0]}: row {row}: loc {locations['loc'].iloc[row]!r} is not a location "
                f"id in [0, {n_loc})"
            )
        locations = locations.assign(loc=loc.astype(np.int64))
    return MobilityData(
        sets["train"],
        sets["validation"],
        sets["test"],
        n_locations=int(n_loc),
        n_users=int(n_users),
        location_ids=np.arange(n_loc),
        user_ids=np.arange(n_users),
        locations=locations,
        info={"source": str(d)},
    )
