"""One loader for a data directory, shared by ``hsoftmax train --data`` and ``hsoftmax data
samples``: :func:`load_dir`.

A directory holds either

* trackintel staypoints: ``staypoints.csv`` (or the one ``*staypoints*.csv``) and optionally
  ``locations.csv`` (or the one ``*locations*.csv``), as trackintel's ``write_staypoints_csv`` and
  ``write_locations_csv`` write them; samples are built with the MHSA protocol
  (:func:`~hsoftmax.data.samples.build_samples`) using ``previous_day``, ``min_history`` and
  ``split``; or
* MHSA sample pickles (:mod:`~hsoftmax.data.mhsa`), one variant chosen by ``previous_day``.

Both give a :class:`~hsoftmax.data.samples.MobilityData` carrying the maps from encoded to original
user and location ids and the absolute data path (``data.path``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .mhsa import MHSA_SPLIT, find_mhsa_variants, load_mhsa_dir
from .samples import MobilityData, build_samples
from .staypoints import DataFormatError, read_locations, read_staypoints

__all__ = [
    "DEFAULT_SPLIT",
    "DEFAULT_PREVIOUS_DAY",
    "DEFAULT_MIN_HISTORY",
    "MHSA_SETTINGS",
    "parse_split",
    "find_staypoint_files",
    "load_staypoints",
    "load_dir",
]

DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_PREVIOUS_DAY = 7
DEFAULT_MIN_HISTORY = 3
# the settings of the MHSA paper per data set (its dataloader's split and 7-day history)
MHSA_SETTINGS = {
    "diy": {"split": (0.8, 0.1, 0.1), "previous_day": 7, "min_history": 3},
    "geolife": {"split": MHSA_SPLIT, "previous_day": 7, "min_history": 3},
}

logger = logging.getLogger("hsoftmax.data")
# the keyword arguments of load_staypoints that load_dir passes on
_STAYPOINT_OPTIONS = ("min_history", "tz", "activities_only")


def parse_split(split) -> tuple[float, float, float]:
    """``split`` as three ratios: a sequence of three numbers or text ``"0.6,0.2,0.2"``.

    Raises ``ValueError`` unless they are three positive numbers summing to 1.
    """
    if isinstance(split, str):
        parts = [p for p in split.replace(" ", ",").split(",") if p]
    else:
        parts = list(split)
    try:
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"split must be three numbers like 0.6,0.2,0.2, got {split!r}") from None
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split must be three positive ratios summing to 1, got {split!r}")
    return ratios


def _positive_int(name: str, value) -> int | None:
    """``value`` as an int >= 1 (None stays None); ``"7"`` and ``7.0`` are accepted."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number >= 1 or number != int(number):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(number)


def _one(d: Path, exact: str, pattern: str, exclude: tuple[str, ...] = ()) -> Path | None:
    """``d/exact`` if it exists, else the single file matching ``pattern`` (none: None)."""
    if (d / exact).is_file():
        return d / exact
    hits = [
        p for p in sorted(d.glob(pattern)) if p.is_file() and not any(x in p.name for x in exclude)
    ]
    if len(hits) > 1:
        raise DataFormatError(
            f"{d}: several {pattern} files and no {exact}: {[p.name for p in hits]}; name the one "
            f"to use {exact}"
        )
    return hits[0] if hits else None


def find_staypoint_files(directory: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """(staypoints, locations) CSVs of a directory; either may be None."""
    d = Path(directory)
    sp = _one(d, "staypoints.csv", "*staypoints*.csv")
    locs = _one(d, "locations.csv", "*locations*.csv", exclude=("vocab_locations",))
    return sp, locs


def load_staypoints(
    staypoints: str | os.PathLike,
    locations: str | os.PathLike | None = None,
    *,
    previous_day: int | None = None,
    min_history: int | None = None,
    split=None,
    tz: str | None = None,
    activities_only: bool = True,
    progress: bool = True,
) -> MobilityData:
    """Samples from a trackintel staypoint CSV (and optional location CSV).

    DBSCAN noise (empty ``location_id``) and non-activity stays are dropped (one log line), then
    :func:`~hsoftmax.data.samples.build_samples` runs with ``previous_day`` (default 7),
    ``min_history`` (default 3) and ``split`` (default 0.8/0.1/0.1; text ``"0.6,0.2,0.2"``
    accepted).  Location ids are encoded on the training split, 0 = padding, 1 = unseen; the
    result keeps the original ids (``location_ids``, ``user_ids``).
    """
    sp_path = Path(staypoints)
    sp = read_staypoints(sp_path, tz=tz, activities_only=activities_only)
    locs = read_locations(locations) if locations is not None else None
    data = build_samples(
        sp,
        split=parse_split(split) if split is not None else DEFAULT_SPLIT,
        previous_day=previous_day if previous_day is not None else DEFAULT_PREVIOUS_DAY,
        min_history=min_history if min_history is not None else DEFAULT_MIN_HISTORY,
        locations=locs,
        source=str(sp_path),
        progress=progress,
    )
    data.info["format"] = "staypoints"
    data.info["original_location_ids"] = True
    data.info["original_user_ids"] = True
    if locations is not None:
        data.info["coordinates"] = Path(locations).name
    data.path = str(sp_path.resolve().parent)
    return data


def load_dir(
    path: str | os.PathLike,
    *,
    previous_day: int | None = None,
    split=None,
    progress: bool = True,
    **staypoint_options,
) -> MobilityData:
    """Load the samples of a data directory (or of a staypoint CSV file).

    Args:
        path: a directory with ``staypoints.csv`` [+ ``locations.csv``] or MHSA pickles (also
            in its ``temp/`` folder, the MHSA code's layout); or a staypoint CSV file (its
            directory's ``locations.csv`` is used when present).
        previous_day: history window in days (staypoints; default 7) or the MHSA variant to
            choose (pickles; needed when several are present).
        split: train/validation/test ratios per user by day (staypoints; default 0.8/0.1/0.1),
            or the split MHSA used, to recover its location encoding from ``dataSet_*.csv``
            (pickles; default 0.6/0.2/0.2).  A sequence or text ``"0.6,0.2,0.2"``.
        progress: progress bars.
        staypoint_options: for staypoints only, passed on to :func:`load_staypoints`:
            ``min_history`` (minimum history stays of a sample; default 3), ``tz`` (time zone
            of the timestamps; default: wall time as written) and ``activities_only`` (drop
            stays with ``is_activity`` false; default true).

    Returns:
        :class:`~hsoftmax.data.samples.MobilityData` with ``path`` set to the absolute
        directory, ``has_coordinates`` telling whether a k-means tree can be built, and
        ``info["coordinates"]`` saying where coordinates came from (or why there are none).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds neither staypoints nor pickles.
        DataFormatError: a bad file (the message names file, line or sample, and key).
        ValueError: a bad ``split``, ``previous_day`` or ``min_history``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data path {p} does not exist")
    unknown = sorted(set(staypoint_options) - set(_STAYPOINT_OPTIONS))
    if unknown:
        raise TypeError(
            f"load_dir() got unexpected keyword arguments {unknown}; "
            f"staypoint options are {list(_STAYPOINT_OPTIONS)}"
        )
    previous_day = _positive_int("previous_day", previous_day)
    min_history = _positive_int("min_history", staypoint_options.pop("min_history", None))
    opts = {"min_history": min_history, "progress": progress, **staypoint_options}
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise FileNotFoundError(
                f"data path {p} is a file; give a staypoint CSV or the directory of the pickles"
            )
        _, locs = find_staypoint_files(p.parent)
        return load_staypoints(p, locs, previous_day=previous_day, split=split, **opts)
    sp, locs = find_staypoint_files(p)
    variants = find_mhsa_variants(p)
    if sp is not None:
        if variants:
            logger.info("%s: using %s (the MHSA pickles beside it are not read)", p, sp.name)
        return load_staypoints(sp, locs, previous_day=previous_day, split=split, **opts)
    if not variants and (p / "temp").is_dir() and find_mhsa_variants(p / "temp"):
        # the MHSA code's own layout: tables in data/, pickles in data/temp/
        logger.info("%s: reading the MHSA pickles in %s", p, p / "temp")
        p, variants = p / "temp", find_mhsa_variants(p / "temp")
    if variants:
        if min_history is not None:
            logger.info("%s: min_history applies to staypoints, not to MHSA pickles", p)
        return load_mhsa_dir(
            p, previous_day=previous_day, split=parse_split(split) if split is not None else None
        )
    raise FileNotFoundError(
        f"{p}: no staypoints.csv and no MHSA pickles (*_train.pk, *_validation.pk, *_test.pk); "
        f"found {sorted(x.name for x in p.iterdir())[:10]}"
    )
