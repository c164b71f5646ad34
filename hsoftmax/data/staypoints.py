"""Read and validate staypoints and locations (trackintel column convention).

Staypoint CSV: one row per stay with the columns ``user_id``, ``location_id``, ``started_at``,
``finished_at`` (required) and optionally ``id``, ``lat``/``lon`` or a WKT ``geom``/``geometry``
point.  Timestamps are ISO 8601 (``2021-10-01T07:30:00+07:00``, ``2021-10-01 07:30:00``).  Time
features use the *local wall-clock time* written in the file: a timestamp with a UTC offset keeps
its wall time (the offset is dropped), as the MHSA preprocessing does; with ``tz`` given, times are
converted to that zone instead (timestamps without offset are then taken as UTC).

Location CSV: ``id`` plus ``lat``/``lon`` or a WKT ``center``/``geom``/``geometry`` point (the
trackintel locations export).

Errors are :class:`DataFormatError` (a ``ValueError``) naming the file, the line (1-based line
number in the CSV file, the header being line 1) or column, and the problem.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "DataFormatError",
    "REQUIRED_COLUMNS",
    "MAX_DURATION_MIN",
    "read_staypoints",
    "read_locations",
    "validate_staypoints",
    "add_time_features",
]

logger = logging.getLogger("hsoftmax.data")

REQUIRED_COLUMNS = ("user_id", "location_id", "started_at", "finished_at")
# MHSA truncates stays longer than two days to 2 days - 1 minute
MAX_DURATION_MIN = 60 * 24 * 2 - 1
_SHOW = 5  # how many offending lines an error message lists
# a UTC offset or Z right after a clock time (not the day of a date-only value)
_OFFSET = r"^(.*\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$"
_WKT_POINT = re.compile(
    r"^\s*POINT\s*\(\s*([-+0-9.eE]+)\s+([-+0-9.eE]+)\s*\)\s*$", flags=re.IGNORECASE
)


class DataFormatError(ValueError):
    """Input data does not have the expected format; the message names file, row/key and problem."""


def _lines(index: np.ndarray) -> str:
    """Format DataFrame row positions as 1-based CSV line numbers (header = line 1)."""
    shown = ", ".join(str(int(i) + 2) for i in index[:_SHOW])
    more = f" and {len(index) - _SHOW} more" if len(index) > _SHOW else ""
    return f"line{'s' if len(index) > 1 else ''} {shown}{more}"


def _int_column(df: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """Return ``df[col]`` as int64, raising on missing, non-numeric or non-integer values."""
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    bad = np.nonzero((num.isna() | (num != np.floor(num))).to_numpy())[0]
    if len(bad):
        vals = ", ".join(repr(raw.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(f"{source}: column {col!r} must hold integers; {_lines(bad)}: {vals}")
    out = num.to_numpy().astype(np.int64)
    neg = np.nonzero(out < 0)[0]
    if len(neg):
        raise DataFormatError(
            f"{source}: column {col!r} has negative ids (out of range); {_lines(neg)}: "
            + ", ".join(str(out[i]) for i in neg[:_SHOW])
        )
    return out


def _parse_times(raw: pd.Series, col: str, source: str, tz: str | None) -> pd.Series:
    """Parse a timestamp column to naive local wall-clock datetimes; raise on unparseable cells."""
    missing = np.nonzero(raw.isna().to_numpy())[0]
    if len(missing):
        raise DataFormatError(f"{source}: column {col!r} is empty on {_lines(missing)}")
    text = raw.astype(str).str.strip()
    if tz is None:
        # keep the wall-clock time as written: drop a trailing UTC offset / Z (also works when
        # offsets differ between rows, e.g. across daylight-saving changes)
        ts = pd.to_datetime(
            text.str.replace(_OFFSET, r"\1", regex=True), format="ISO8601", errors="coerce"
        )
    else:
        ts = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
        ts = ts.dt.tz_convert(tz).dt.tz_localize(None)
    bad = np.nonzero(ts.isna().to_numpy())[0]
    if len(bad):
        vals = ", ".join(repr(text.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(
            f"{source}: column {col!r} has unparseable timestamps on {_lines(bad)}: {vals}"
        )
    return ts.astype("datetime64[ns]")


def _points_from_wkt(raw: pd.Series, col: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse WKT ``POINT (lon lat)`` strings into (lat, lon) arrays."""
    m = raw.astype(str).str.extract(_WKT_POINT)
    bad = np.nonzero(m[0].isna().to_numpy())[0]
    if len(bad):
        vals = ", ".join(repr(raw.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(
            f"{source}: column {col!r} must hold WKT points 'POINT (lon lat)'; {_lines(bad)}: "
            f"{vals}"
        )
    return m[1].astype(float).to_numpy(), m[0].astype(float).to_numpy()


def _coords(df: pd.DataFrame, source: str, wkt_cols: tuple[str, ...]):
    """Return (lat, lon) float arrays from lat/lon or a WKT column, or None if neither exists."""
    if "lat" in df.columns and "lon" in df.columns:
        out = []
        for col in ("lat", "lon"):
            v = pd.to_numeric(df[col], errors="coerce")
            bad = np.nonzero(v.isna().to_numpy())[0]
            if len(bad):
                raise DataFormatError(
                    f"{source}: column {col!r} must hold numbers; {_lines(bad)}: "
                    + ", ".join(repr(df[col].iloc[i]) for i in bad[:_SHOW])
                )
            out.append(v.to_numpy(dtype=np.float64))
        lat, lon = out
        bad = np.nonzero((np.abs(lat) > 90) | (np.abs(lon) > 180))[0]
        if len(bad):
            raise DataFormatError(
                f"{source}: lat/lon out of range (|lat| <= 90, |lon| <= 180) on {_lines(bad)}"
            )
        return lat, lon
    for col in wkt_cols:
        if col in df.columns:
            return _points_from_wkt(df[col], col, source)
    return None


def validate_staypoints(
    df: pd.DataFrame, source: str = "<DataFrame>", tz: str | None = None
) -> pd.DataFrame:
    """Check and normalise a raw staypoint table.

    Args:
        df: raw table with at least :data:`REQUIRED_COLUMNS`; extra columns are ignored except
            optional ``lat``/``lon`` or ``geom``/``geometry`` (WKT points).
        source: name used in error messages (the file path).
        tz: time zone to convert timestamps to before taking wall-clock time (timestamps without
            an offset count as UTC); ``None`` keeps the wall time written in the file.

    Returns:
        A new DataFrame with columns ``user_id``, ``location_id`` (int64), ``started_at``,
        ``finished_at`` (naive ``datetime64[ns]``, local time) and ``lat``/``lon`` when present,
        sorted by user and start time; the original row position is kept in ``row``.

    Raises:
        DataFormatError: on missing columns, non-integer or negative ids, unparseable timestamps or
            a stay that finishes before it starts.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"{source}: missing required column(s) {missing}; found {list(df.columns)}"
        )
    out = pd.DataFrame(
        {
            "row": np.arange(len(df), dtype=np.int64),
            "user_id": _int_column(df, "user_id", source),
            "location_id": _int_column(df, "location_id", source),
            "started_at": _parse_times(df["started_at"], "started_at", source, tz).to_numpy(),
            "finished_at": _parse_times(df["finished_at"], "finished_at", source, tz).to_numpy(),
        }
    )
    neg = np.nonzero((out["finished_at"] < out["started_at"]).to_numpy())[0]
    if len(neg):
        raise DataFormatError(
            f"{source}: negative duration (finished_at before started_at) on {_lines(neg)}"
        )
    coords = _coords(df, source, ("geom", "geometry"))
    if coords is not None:
        out["lat"], out["lon"] = coords
    return out.sort_values(["user_id", "started_at", "row"], kind="stable").reset_index(drop=True)


def read_staypoints(path: str | os.PathLike, tz: str | None = None) -> pd.DataFrame:
    """Read a staypoint CSV (trackintel columns) and validate it with :func:`validate_staypoints`.

    Returns the normalised DataFrame (see :func:`validate_staypoints`).
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}: file is empty (expected a header line)") from None
    except pd.errors.ParserError as e:
        raise DataFormatError(f"{path}: not a readable CSV file: {e}") from None
    return validate_staypoints(raw, source=str(path), tz=tz)


def read_locations(path: str | os.PathLike) -> pd.DataFrame:
    """Read a location CSV: ``id`` plus ``lat``/``lon`` or a WKT ``center``/``geom``/``geometry``.

    Returns a DataFrame with columns ``id`` (int64), ``lat``, ``lon`` (float64), sorted by id.
    Raises :class:`DataFormatError` on a missing/invalid column or duplicate ids.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}: file is empty (expected a header line)") from None
    src = str(path)
    if "id" not in raw.columns:
        raise DataFormatError(f"{src}: missing required column 'id'; found {list(raw.columns)}")
    coords = _coords(raw, src, ("center", "geom", "geometry"))
    if coords is None:
        raise DataFormatError(
            f"{src}: missing coordinates: need columns 'lat' and 'lon' or a WKT column "
            f"'center'/'geom'/'geometry'; found {list(raw.columns)}"
        )
    ids = _int_column(raw, "id", src)
    dup = np.nonzero(pd.Series(ids).duplicated().to_numpy())[0]
    if len(dup):
        raise DataFormatError(f"{src}: duplicate location id on {_lines(dup)}")
    out = pd.DataFrame({"id": ids, "lat": coords[0], "lon": coords[1]})
    return out.sort_values("id").reset_index(drop=True)


def add_time_features(sp: pd.DataFrame) -> pd.DataFrame:
    """Add the MHSA time features to a validated staypoint table (in place; also returned).

    Adds ``start_day`` (days since the user's first tracked calendar day), ``start_min`` (minute of
    the day the stay started), ``weekday`` (Monday = 0) and ``duration`` (whole minutes, clipped to
    :data:`MAX_DURATION_MIN` like MHSA).  Logs how many stays were clipped.
    """
    start = sp["started_at"]
    day = start.dt.normalize()
    first = day.groupby(sp["user_id"]).transform("min")
    sp["start_day"] = ((day - first) // pd.Timedelta(days=1)).astype(np.int64)
    sp["start_min"] = (start.dt.hour * 60 + start.dt.minute).astype(np.int64)
    sp["weekday"] = start.dt.day_of_week.astype(np.int64)
    dur = ((sp["finished_at"] - start) // pd.Timedelta(minutes=1)).astype(np.int64)
    n_clip = int((dur > MAX_DURATION_MIN).sum())
    if n_clip:
        logger.info("clipped %d stays longer than %d minutes", n_clip, MAX_DURATION_MIN)
    sp["duration"] = dur.clip(upper=MAX_DURATION_MIN)
    return sp
