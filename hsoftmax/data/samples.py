"""Next-location samples following the MHSA protocol, MHSA pickle IO and the preset cache.

Protocol (Hong et al., "How do you go where? Improving next location prediction by learning travel
mode information using transformers", SIGSPATIAL 2022, and its public preprocessing code), as
implemented by :func:`build_samples`:

1. Time features per stay: ``start_day`` = days since the user's first tracked calendar day,
   ``start_min`` = minute of the day, ``weekday`` (Monday = 0), ``duration`` in whole minutes
   clipped to 2 days - 1 minute.
2. Split per user by day: with ``m`` = the user's last ``start_day``, a stay is *train* if
   ``start_day < m * r_train``, *validation* if ``start_day < m * (r_train + r_val)``, else *test*
   (default 0.8/0.1/0.1 as for DIY; 0.6/0.2/0.2 as for Geolife).
3. Inside each split separately (histories never cross splits), per user: a stay ``i`` is a target
   unless it lies in the first ``previous_day`` days of that user's split (``start_day -
   first start_day in the split < previous_day``).  Its history is every earlier stay of the user
   in the split whose ``start_day >= start_day_i - previous_day`` (the previous ``previous_day``
   days plus earlier stays the same day).  Targets with fewer than ``min_history`` (3) history
   stays are skipped.
4. Users without at least one target in each of the three splits are dropped (logged with count).
5. Location ids are encoded on the training split only: ``2..V-1`` in ascending order of the
   original id, ``1`` = not seen in training, ``0`` = padding; ``V`` = number of training
   locations + 2 is the model's vocabulary size.  Users are re-numbered ``1..N`` (0 unused).

A sample (an MHSA pickle entry) is a dict: ``X`` (history location ids), ``user_X``, ``weekday_X``,
``start_min_X``, ``dur_X`` (minutes), ``diff`` (days between each history stay and the target's
day), all int64 arrays of the history length, and ``Y`` (the target location id, int).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .staypoints import DataFormatError, add_time_features, read_locations, read_staypoints

__all__ = [
    "MHSA_KEYS",
    "SPLITS",
    "SampleSet",
    "MobilityData",
    "build_samples",
    "save_mhsa",
    "load_mhsa",
    "load_preset",
    "default_cache_dir",
    "save_id_maps",
    "load_id_maps",
]

logger = logging.getLogger("hsoftmax.data")

SPLITS = ("train", "validation", "test")
MHSA_KEYS = ("X", "user_X", "weekday_X", "start_min_X", "dur_X", "diff", "Y")
PAD, UNSEEN = 0, 1
_SEQ_KEYS = MHSA_KEYS[:-1]
_CACHE_VERSION = 1


# whole numbers above 2**53 are not exact in float64; ids and minutes are far below
_MAX_WHOLE = 2.0**53


def _whole_scalar(y, what: str) -> float:
    """``y`` (int, float or one-element array) as a float holding a whole number, else raise."""
    a = np.asarray(y)
    if isinstance(y, bool) or a.size != 1 or a.dtype.kind not in "iuf":
        raise DataFormatError(f"{what} must be an integer, got {y!r}")
    v = float(a.reshape(-1)[0])
    if not (np.isfinite(v) and v == np.floor(v) and abs(v) < _MAX_WHOLE):
        raise DataFormatError(f"{what} must be a whole number, got {v!r}")
    return v


def _whole_array(parts: list, key: str, ends: np.ndarray, source: str) -> np.ndarray:
    """Concatenate one key's per-sample arrays into int64, raising on a non-integral value.

    ``ends[i]`` is the end offset of sample ``i`` in the concatenation; the error names the
    sample that holds the first bad value.
    """
    if not parts:
        return np.empty(0, np.int64)
    flat = np.concatenate(parts)
    if flat.dtype.kind == "f":
        bad = np.flatnonzero(
            ~np.isfinite(flat) | (flat != np.floor(flat)) | (abs(flat) >= _MAX_WHOLE)
        )
        if len(bad):
            i = int(np.searchsorted(ends, bad[0], side="right"))
            raise DataFormatError(
                f"{source}: sample {i} key {key!r} has non-integral value {float(flat[bad[0]])!r} "
                f"(whole numbers expected; {len(bad)} such values in total)"
            )
    return flat.astype(np.int64)


@dataclass
class SampleSet:
    """The samples of one split, stored compactly.

    History stays live once in the per-stay arrays ``loc, user, weekday, start_min, dur, day``
    (length R); sample ``i`` has history ``[hist_start[i], hist_end[i])`` of those arrays, target
    ``y[i]`` on day ``target_day[i]`` (``diff = target_day - day``).  Indexing yields MHSA dicts,
    so a SampleSet can be used wherever the list of MHSA dicts is expected.
    """

    loc: np.ndarray
    user: np.ndarray
    weekday: np.ndarray
    start_min: np.ndarray
    dur: np.ndarray
    day: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    target_day: np.ndarray
    y: np.ndarray

    _RECORD_FIELDS = ("loc", "user", "weekday", "start_min", "dur", "day")
    _SAMPLE_FIELDS = ("hist_start", "hist_end", "target_day", "y")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        """Return sample ``i`` as an MHSA dict (int64 arrays, ``Y`` an int)."""
        s, e = int(self.hist_start[i]), int(self.hist_end[i])
        return {
            "X": self.loc[s:e].astype(np.int64),
            "user_X": self.user[s:e].astype(np.int64),
            "weekday_X": self.weekday[s:e].astype(np.int64),
            "start_min_X": self.start_min[s:e].astype(np.int64),
            "dur_X": self.dur[s:e].astype(np.int64),
            "diff": (self.target_day[i] - self.day[s:e]).astype(np.int64),
            "Y": int(self.y[i]),
        }

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """History length of every sample, shape (N,)."""
        return self.hist_end - self.hist_start

    @property
    def sample_user(self) -> np.ndarray:
        """User of every sample (the user of its history), shape (N,)."""
        return self.user[self.hist_start]

    @property
    def last_loc(self) -> np.ndarray:
        """Location of the last history stay of every sample, shape (N,)."""
        return self.loc[self.hist_end - 1]

    def to_mhsa(self) -> list[dict]:
        """Return all samples as the MHSA list of dicts."""
        return [self[i] for i in range(len(self))]

    @classmethod
    def from_mhsa(cls, samples: list, source: str = "<samples>") -> SampleSet:
        """Build a SampleSet from an MHSA list of dicts, validating keys, types and lengths.

        The sequence keys may hold any numeric dtype whose values are whole numbers: MHSA's own
        preprocessing writes ``dur_X`` as float64 (durations are ``total_seconds() // 60`` read
        back from a CSV), and ``Y`` may be a float holding a whole number.

        Raises :class:`DataFormatError` naming ``source``, the sample index (0-based position in
        the list) and key of the first problem (missing key, non-numeric or non-integral value,
        wrong length).
        """
        if not isinstance(samples, list | tuple):
            raise DataFormatError(
                f"{source}: expected a list of sample dicts, got {type(samples).__name__}"
            )
        cols: dict[str, list] = {k: [] for k in _SEQ_KEYS}
        ys = np.empty(len(samples), dtype=np.float64)
        lengths = np.empty(len(samples), dtype=np.int64)
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                raise DataFormatError(
                    f"{source}: sample {i} is a {type(s).__name__}, expected a dict"
                )
            miss = [k for k in MHSA_KEYS if k not in s]
            if miss:
                raise DataFormatError(
                    f"{source}: sample {i} lacks key(s) {miss}; expected {list(MHSA_KEYS)}"
                )
            n = None
            for k in _SEQ_KEYS:
                a = np.asarray(s[k])
                if a.ndim != 1 or a.dtype.kind not in "iuf":
                    raise DataFormatError(
                        f"{source}: sample {i} key {k!r} must be a 1-D numeric array of whole "
                        f"numbers, got dtype {a.dtype} shape {a.shape}"
                    )
                if n is None:
                    n = len(a)
                    if n == 0:
                        raise DataFormatError(f"{source}: sample {i} key {k!r} is empty")
                elif len(a) != n:
                    raise DataFormatError(
                        f"{source}: sample {i} key {k!r} has length {len(a)}, but 'X' has {n}"
                    )
                cols[k].append(a)
            ys[i] = _whole_scalar(s["Y"], f"{source}: sample {i} key 'Y'")
            lengths[i] = n
        ends = np.cumsum(lengths)
        flat = {k: _whole_array(v, k, ends, source) for k, v in cols.items()}
        starts = ends - lengths
        return cls(
            loc=flat["X"],
            user=flat["user_X"],
            weekday=flat["weekday_X"],
            start_min=flat["start_min_X"],
            dur=flat["dur_X"],
            day=-flat["diff"],  # relative days: the target is day 0
            hist_start=starts,
            hist_end=ends,
            target_day=np.zeros(len(samples), dtype=np.int64),
            y=ys.astype(np.int64),
        )

    def validate(self, n_locations: int | None = None, source: str = "<samples>") -> None:
        """Check value ranges; raise :class:`DataFormatError` naming the sample and key.

        Checks: ``X >= 1``, ``1 <= Y`` and, when ``n_locations`` (vocabulary size) is given,
        ``X, Y < n_locations``; weekday in 0..6; start minute in 0..1439; duration >= 0;
        ``diff >= 0``; user >= 0.
        """
        sample_of = np.repeat(np.arange(len(self)), self.lengths)
        hi = n_locations if n_locations is not None else None
        checks = [
            ("X", self.loc[self._hist_index()], 1, hi),
            ("user_X", self.user[self._hist_index()], 0, None),
            ("weekday_X", self.weekday[self._hist_index()], 0, 7),
            ("start_min_X", self.start_min[self._hist_index()], 0, 1440),
            ("dur_X", self.dur[self._hist_index()], 0, None),
            ("diff", np.repeat(self.target_day, self.lengths) - self.day[self._hist_index()],
             0, None),
        ]  # fmt: skip
        for key, v, lo, up in checks:
            bad = np.nonzero((v < lo) | ((v >= up) if up is not None else False))[0]
            if len(bad):
                i = int(sample_of[bad[0]])
                rng = f"[{lo}, {up})" if up is not None else f">= {lo}"
                raise DataFormatError(
                    f"{source}: sample {i} key {key!r} has value {int(v[bad[0]])} out of range "
                    f"{rng} ({len(bad)} bad values in total)"
                )
        bad = np.nonzero((self.y < 1) | ((self.y >= hi) if hi is not None else False))[0]
        if len(bad):
            rng = f"[1, {hi})" if hi is not None else ">= 1"
            raise DataFormatError(
                f"{source}: sample {int(bad[0])} key 'Y' has value {int(self.y[bad[0]])} out of "
                f"range {rng} ({len(bad)} bad samples in total)"
            )

    def _hist_index(self) -> np.ndarray:
        """Indices into the per-stay arrays of all history stays, sample by sample."""
        lengths = self.lengths
        offs = np.repeat(self.hist_start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return np.arange(int(lengths.sum())) + offs

    def save_npz(self, path: str | os.PathLike) -> None:
        """Save to a compressed-free ``.npz`` (fast to reload)."""
        np.savez(path, **{k: getattr(self, k) for k in self._RECORD_FIELDS + self._SAMPLE_FIELDS})

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> SampleSet:
        """Load a SampleSet saved by :meth:`save_npz`."""
        with np.load(path) as z:
            return cls(**{k: z[k] for k in cls._RECORD_FIELDS + cls._SAMPLE_FIELDS})


@dataclass
class MobilityData:
    """Train/validation/test samples plus the vocabulary information a model needs.

    ``n_locations``: vocabulary size ``V`` (0 = padding, 1 = unseen in training, 2..V-1 locations).
    ``n_users``: user embedding size (users are 1..n_users-1).
    ``location_ids[k]``: original location id of encoded id ``k`` (-1 for 0 and 1).
    ``user_ids[k]``: original user id of encoded user ``k`` (-1 for 0).
    ``locations``: DataFrame with columns ``loc`` (encoded id 2..V-1), ``id`` (original id),
    ``lat``, ``lon`` (NaN where no coordinates are known); the tree builders cluster on these.
    ``info``: counts and settings (JSON-serialisable); ``info["coordinates"]`` says where the
    coordinates came from or why there are none.
    ``path``: the data directory or file the samples were built from (absolute), if any.

    Both id maps and ``path`` are saved and loaded with the samples (:meth:`save`, :meth:`load`,
    :meth:`write_mhsa` and :func:`~hsoftmax.data.sources.load_dir`).
    """

    train: SampleSet
    validation: SampleSet
    test: SampleSet
    n_locations: int
    n_users: int
    location_ids: np.ndarray
    user_ids: np.ndarray
    locations: pd.DataFrame
    info: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def has_coordinates(self) -> bool:
        """Whether any location of the vocabulary has a known lat/lon (a k-means tree needs it;
        without, use a tree that needs no coordinates: huffman, balanced, co-occurrence)."""
        locs = self.locations
        if len(locs) == 0 or not {"lat", "lon"} <= set(locs.columns):
            return False
        ll = locs[["lat", "lon"]].to_numpy(np.float64)
        return bool(np.isfinite(ll).all(axis=1).any())

    def coordinates(self) -> np.ndarray:
        """(V, 2) lat/lon of every encoded id, padding (0) and unseen (1) included.

        Ids without known coordinates (0, 1, and any location the location table lacks) get the
        mean of the known ones, so a tree built from these features has exactly ``V`` leaves, one
        per model class.  Raises :class:`DataFormatError` when no location has coordinates.
        """
        from .staypoints import vocabulary_coordinates

        return vocabulary_coordinates(self.locations, self.n_locations, source=self.path or "")

    @property
    def splits(self) -> dict[str, SampleSet]:
        """The three splits by name (``train``, ``validation``, ``test``)."""
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def save(self, out_dir: str | os.PathLike) -> None:
        """Save into ``out_dir`` (``<split>.npz``, ``meta.json``, ``vocab_locations.csv``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, s in self.splits.items():
            s.save_npz(out / f"{name}.npz")
        np.savez(out / "ids.npz", location_ids=self.location_ids, user_ids=self.user_ids)
        self.locations.to_csv(out / "vocab_locations.csv", index=False, lineterminator="\n")
        meta = {
            "version": _CACHE_VERSION,
            "n_locations": self.n_locations,
            "n_users": self.n_users,
            "info": self.info,
            "path": self.path,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> MobilityData:
        """Load what :meth:`save` wrote."""
        d = Path(in_dir)
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("version") != _CACHE_VERSION:
            raise DataFormatError(f"{d / 'meta.json'}: cache version {meta.get('version')!r}")
        with np.load(d / "ids.npz") as z:
            location_ids, user_ids = z["location_ids"], z["user_ids"]
        return cls(
            *(SampleSet.load_npz(d / f"{name}.npz") for name in SPLITS),
            n_locations=int(meta["n_locations"]),
            n_users=int(meta["n_users"]),
            location_ids=location_ids,
            user_ids=user_ids,
            locations=pd.read_csv(d / "vocab_locations.csv"),
            info=meta["info"],
            path=meta.get("path"),
        )

    def write_mhsa(self, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
        """Write ``<prefix>train.pk``, ``<prefix>validation.pk``, ``<prefix>test.pk`` MHSA pickles
        and ``<prefix>vocab_locations.csv`` (encoded ``loc`` -> original ``id``, ``lat``, ``lon``),
        ``<prefix>vocab_users.csv`` (encoded ``user`` -> original ``id``) and
        ``<prefix>meta.json`` into ``out_dir``.  :func:`~hsoftmax.data.sources.load_dir` reads the
        directory back with both id maps.

        Returns the written paths.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, s in self.splits.items():
            p = out / f"{prefix}{name}.pk"
            save_mhsa(s, p)
            paths.append(p)
        paths += save_id_maps(self, out, prefix)
        p = out / f"{prefix}meta.json"
        meta = {"n_locations": self.n_locations, "n_users": self.n_users, "info": self.info}
        p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        paths.append(p)
        return paths


def save_id_maps(data: MobilityData, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write the maps from encoded to original ids as plain CSV files (for a run directory, so
    that outputs can use the original ids without pickles).

    ``<prefix>vocab_locations.csv``: ``loc`` (encoded id 2..V-1), ``id`` (original id, -1 when
    unknown), ``lat``, ``lon``; ``<prefix>vocab_users.csv``: ``user`` (encoded 1..n_users-1),
    ``id`` (original).  Returns the two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p_loc = out / f"{prefix}vocab_locations.csv"
    data.locations.to_csv(p_loc, index=False, lineterminator="\n")
    p_user = out / f"{prefix}vocab_users.csv"
    users = pd.DataFrame(
        {"user": np.arange(1, len(data.user_ids), dtype=np.int64), "id": data.user_ids[1:]}
    )
    users.to_csv(p_user, index=False, lineterminator="\n")
    return [p_loc, p_user]


def load_id_maps(
    in_dir: str | os.PathLike, n_locations: int, prefix: str = ""
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read what :func:`save_id_maps` wrote.

    Returns ``(location_ids, user_ids, locations)``: ``location_ids[k]`` the original id of
    encoded location ``k`` (length ``n_locations``; -1 for padding, unseen and unknown),
    ``user_ids[u]`` the original id of encoded user ``u`` (-1 for 0), and the location table.
    Raises :class:`DataFormatError` naming the file on a missing column or an id out of range.
    """
    d = Path(in_dir)
    p_loc, p_user = d / f"{prefix}vocab_locations.csv", d / f"{prefix}vocab_users.csv"
    out = []
    for path, key, hi in ((p_loc, "loc", n_locations), (p_user, "user", None)):
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise DataFormatError(f"{path}: not a readable CSV file ({e})") from None
        if not {key, "id"} <= set(table.columns):
            raise DataFormatError(
                f"{path}: needs columns {key!r} and 'id'; found {list(table.columns)}"
            )
        enc = pd.to_numeric(table[key], errors="coerce")
        top = hi if hi is not None else np.inf
        bad = np.flatnonzero(~(enc.notna() & (enc == enc.round()) & (enc >= 1) & (enc < top)))
        if len(bad):
            cell = str(table[key].iloc[bad[0]])
            raise DataFormatError(
                f"{path}: row {int(bad[0])}: {key} {cell!r} is not an encoded id in [1, {top})"
            )
        size = hi if hi is not None else int(enc.max()) + 1 if len(enc) else 1
        ids = np.full(size, -1, dtype=np.int64)
        ids[enc.to_numpy(np.int64)] = pd.to_numeric(table["id"]).to_numpy(np.int64)
        out.append((ids, table.assign(**{key: enc.astype(np.int64)})))
    (location_ids, locations), (user_ids, _) = out
    return location_ids, user_ids, locations


def _split_of(day: np.ndarray, user_max_day: np.ndarray, split) -> np.ndarray:
    """0/1/2 = train/validation/test per stay (MHSA: thresholds on the user's last day)."""
    r_train, r_val = split[0], split[0] + split[1]
    return np.where(
        day < user_max_day * r_train, 0, np.where(day < user_max_day * r_val, 1, 2)
    ).astype(np.int64)


def _histories(group: np.ndarray, day: np.ndarray, previous_day: int):
    """For stays sorted by (group, time): history start index and days since the group's start.

    ``group`` is non-decreasing and ``day`` non-decreasing within a group.  The history of stay
    ``i`` is ``[lo[i], i)``: earlier stays of its group with ``day >= day[i] - previous_day``.
    """
    n = len(day)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    span = int(day.max() - day.min()) + previous_day + 2
    key = group * span + (day - day.min())
    lo = np.searchsorted(key, key - previous_day, side="left")
    first = np.searchsorted(group, group, side="left")
    return lo, day - day[first]


def build_samples(
    staypoints: pd.DataFrame,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    previous_day: int = 7,
    min_history: int = 3,
    locations: pd.DataFrame | None = None,
    source: str = "<staypoints>",
    progress: bool = True,
) -> MobilityData:
    """Build train/validation/test samples from validated staypoints (MHSA protocol).

    Args:
        staypoints: output of :func:`~hsoftmax.data.staypoints.read_staypoints` /
            :func:`~hsoftmax.data.staypoints.validate_staypoints` (sorted by user and time).
        split: train/validation/test ratios of each user's tracked days (must sum to 1).
        previous_day: history window in days.
        min_history: minimum number of history stays of a sample.
        locations: optional ``id, lat, lon`` table (from
            :func:`~hsoftmax.data.staypoints.read_locations`); otherwise coordinates are the mean
            ``lat``/``lon`` of each location's staypoints when present, else NaN.
        source: name of the staypoint input, used in messages.
        progress: show a progress bar.

    Returns:
        :class:`MobilityData`.  Dropped users are logged (logger ``hsoftmax.data``, WARNING) with
        their count and number of stays.
    """
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"split must be three positive ratios summing to 1, got {split}")
    if previous_day < 1 or min_history < 1:
        raise ValueError("previous_day and min_history must be >= 1")
    t0 = time.perf_counter()
    bar = tqdm(total=4, desc="samples", disable=not progress, leave=False, delay=1.0)
    sp = staypoints
    if "start_day" not in sp.columns:
        sp = add_time_features(sp.copy())
    if len(sp) == 0:
        raise DataFormatError(f"{source}: no staypoints")
    user_raw = sp["user_id"].to_numpy(np.int64)
    loc_raw = sp["location_id"].to_numpy(np.int64)
    day = sp["start_day"].to_numpy(np.int64)
    if np.any(np.diff(user_raw) < 0) or np.any(
        (np.diff(sp["started_at"].to_numpy()) < np.timedelta64(0)) & (np.diff(user_raw) == 0)
    ):
        raise ValueError(f"{source}: staypoints must be sorted by user_id and started_at")
    if locations is not None:
        known = np.isin(loc_raw, locations["id"].to_numpy())
        bad = np.nonzero(~known)[0]
        if len(bad):
            rows = sp["row"].to_numpy()[bad] + 2 if "row" in sp.columns else bad
            raise DataFormatError(
                f"{source}: location_id {int(loc_raw[bad[0]])} (line {int(rows[0])}) is not in "
                f"the locations table ({len(bad)} stays with unknown location ids)"
            )

    _, ucode = np.unique(user_raw, return_inverse=True)
    user_max = np.zeros(ucode.max() + 1, dtype=np.int64)
    np.maximum.at(user_max, ucode, day)
    split_id = _split_of(day, user_max[ucode], split)
    order = np.argsort(split_id, kind="stable")  # -> (split, user, time)
    group = split_id[order] * (ucode.max() + 1) + ucode[order]
    lo, since_start = _histories(group, day[order], previous_day)
    n_hist = np.arange(len(order)) - lo
    valid = (since_start >= previous_day) & (n_hist >= min_history)
    bar.update()

    # users need a target in each split (MHSA drops the others)
    n_u = ucode.max() + 1
    has = np.zeros((3, n_u), dtype=bool)
    has[split_id[order][valid], ucode[order][valid]] = True
    keep_user = has.all(axis=0)
    n_drop = int((~keep_user).sum())
    if n_drop:
        missing = [f"{(~has[k]).sum()} without {name} samples" for k, name in enumerate(SPLITS)]
        logger.warning(
            "%s: dropped %d of %d users (%d stays) with no sample in some split (%s)",
            source,
            n_drop,
            n_u,
            int((~keep_user[ucode]).sum()),
            ", ".join(missing),
        )
    if not keep_user.any():
        raise DataFormatError(
            f"{source}: no user has samples in all three splits (previous_day={previous_day}, "
            f"min_history={min_history}, split={split}); each split of a user must span more "
            "than previous_day tracked days: lower data.previous_day or data.min_history, or "
            "change data.split"
        )
    kept = keep_user[ucode[order]]
    n_not_target = int((~valid & kept).sum())
    logger.info(
        "%s: %d stays of kept users are history only (first %d days of a split or fewer than %d "
        "history stays)",
        source,
        n_not_target,
        previous_day,
        min_history,
    )
    bar.update()

    # encode on train only; users 1..N
    loc_o = loc_raw[order]
    is_train = (split_id[order] == 0) & kept
    vocab = np.unique(loc_o[is_train])
    pos = np.searchsorted(vocab, loc_o).clip(0, max(len(vocab) - 1, 0))
    enc = np.where(vocab[pos] == loc_o, pos + 2, UNSEEN).astype(np.int64)
    kept_users = np.nonzero(keep_user)[0]
    user_new = np.zeros(n_u, dtype=np.int64)
    user_new[kept_users] = np.arange(1, len(kept_users) + 1)
    user_uniq = np.unique(user_raw)

    tf = {
        "weekday": sp["weekday"].to_numpy(np.int64)[order],
        "start_min": sp["start_min"].to_numpy(np.int64)[order],
        "dur": sp["duration"].to_numpy(np.int64)[order],
    }
    sets = []
    sid = split_id[order]
    for k in range(3):
        m = (sid == k) & kept
        idx = np.nonzero(m)[0]
        # histories are contiguous within (split, user) and all of a kept user's stays are kept,
        # so history starts shift by the number of stays removed before them
        shift = np.cumsum(~m) - (~m)
        tgt = np.nonzero(m & valid)[0]
        sets.append(
            SampleSet(
                loc=enc[idx],
                user=user_new[ucode[order][idx]],
                weekday=tf["weekday"][idx].astype(np.int8),
                start_min=tf["start_min"][idx].astype(np.int16),
                dur=tf["dur"][idx].astype(np.int16),
                day=day[order][idx].astype(np.int32),
                hist_start=(lo[tgt] - shift[lo[tgt]]).astype(np.int64),
                hist_end=(tgt - shift[tgt]).astype(np.int64),
                target_day=day[order][tgt].astype(np.int32),
                y=enc[tgt],
            )
        )
    bar.update()

    V = len(vocab) + 2
    location_ids = np.concatenate([[-1, -1], vocab]).astype(np.int64)
    lat = np.full(len(vocab), np.nan)
    lon = np.full(len(vocab), np.nan)
    if locations is not None:
        li = locations.set_index("id")
        lat, lon = li.loc[vocab, "lat"].to_numpy(), li.loc[vocab, "lon"].to_numpy()
        coord_note = "location table"
    elif "lat" in sp.columns:
        means = sp.groupby("location_id")[["lat", "lon"]].mean()
        lat, lon = means.loc[vocab, "lat"].to_numpy(), means.loc[vocab, "lon"].to_numpy()
        coord_note = "mean staypoint position per location (no location table)"
    else:
        coord_note = "none: no location table and no staypoint geometry"
    loc_table = pd.DataFrame(
        {"loc": np.arange(2, V, dtype=np.int64), "id": vocab, "lat": lat, "lon": lon}
    )
    info = {
        "source": source,
        "split": list(split),
        "previous_day": previous_day,
        "min_history": min_history,
        "n_staypoints": int(len(sp)),
        "n_users_in": int(n_u),
        "n_users_dropped": n_drop,
        "n_samples": {name: len(s) for name, s in zip(SPLITS, sets, strict=True)},
        "unseen_targets": {
            name: int((s.y == UNSEEN).sum()) for name, s in zip(SPLITS, sets, strict=True)
        },
        "seconds": round(time.perf_counter() - t0, 3),
        "coordinates": coord_note,
    }
    bar.update()
    bar.close()
    return MobilityData(
        *sets,
        n_locations=V,
        n_users=len(kept_users) + 1,
        location_ids=location_ids,
        user_ids=np.concatenate([[-1], user_uniq[kept_users]]).astype(np.int64),
        locations=loc_table,
        info=info,
    )


# --------------------------------------------------------------------------------------------
# MHSA pickles


def save_mhsa(samples: SampleSet | list, path: str | os.PathLike) -> None:
    """Write samples (a :class:`SampleSet` or MHSA list of dicts) as an MHSA pickle."""
    data = samples.to_mhsa() if isinstance(samples, SampleSet) else list(samples)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_mhsa(
    path: str | os.PathLike, n_locations: int | None = None, as_sampleset: bool = False
) -> list[dict] | SampleSet:
    """Read an MHSA sample pickle and validate it.

    Args:
        path: pickle holding a list of dicts with keys :data:`MHSA_KEYS`.
        n_locations: vocabulary size; when given, location ids must be < n_locations.
        as_sampleset: return a :class:`SampleSet` instead of the list of dicts.

    Raises:
        DataFormatError: naming the file, the sample index (0-based) and key, for a file that is
            not a pickle, a non-list, a missing key, a wrong type/length, or an id out of range.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
        raise DataFormatError(f"{path}: not a readable pickle file: {e}") from None
    s = SampleSet.from_mhsa(data, source=str(path))
    s.validate(n_locations, source=str(path))
    return s if as_sampleset else data


# --------------------------------------------------------------------------------------------
# presets and their cache


def default_cache_dir() -> Path:
    """``$HSOFTMAX_CACHE/data`` if set, else ``~/.cache/hsoftmax/data``."""
    root = os.environ.get("HSOFTMAX_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "hsoftmax" / "data"


def load_preset(
    name: str,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    split: tuple[float, float, float] | None = None,
    previous_day: int | None = None,
) -> MobilityData:
    """Return the samples of a synthetic preset, generating and caching them on first use.

    The cache lives in ``<cache_dir>/<name>-seed<seed>[-<split>-pd<previous_day>]`` (default
    ``cache_dir``: :func:`default_cache_dir`) and holds the CSVs (``staypoints.csv``,
    ``locations.csv``) and the built samples.  It is written to a temporary directory and renamed
    into place, so concurrent or interrupted runs never leave a half-written cache.

    Args:
        name: preset name (``diy``, ``geolife``, ``small``, ``diy-100k``, ``diy-1m``).
        seed: generator seed.
        cache_dir: parent directory of the cache.
        progress: show progress bars.
        split, previous_day: override the preset's sample-building defaults.

    Returns:
        :class:`MobilityData` (``info`` includes ``generation_seconds``).
    """
    from .synthetic import get_preset, synthesize_to_dir

    cfg = get_preset(name)
    split = tuple(split) if split is not None else cfg.split
    previous_day = previous_day if previous_day is not None else cfg.previous_day
    tag = f"{name}-seed{seed}"
    if split != cfg.split or previous_day != cfg.previous_day:
        tag += "-" + "-".join(f"{r:g}" for r in split) + f"-pd{previous_day}"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / tag
    if (target / "meta.json").is_file():
        return MobilityData.load(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
    try:
        res = synthesize_to_dir(cfg, seed, tmp, progress=progress)
        sp = read_staypoints(tmp / "staypoints.csv")
        locs = read_locations(tmp / "locations.csv")
        data = build_samples(
            sp,
            split=split,
            previous_day=previous_day,
            locations=locs,
            source=f"{tag}/staypoints.csv",
            progress=progress,
        )
        data.info["generation_seconds"] = round(res.seconds, 3)
        data.info["preset"] = name
        data.info["seed"] = seed
        data.save(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # another process finished first: use its cache, discard ours
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MobilityData.load(target)
