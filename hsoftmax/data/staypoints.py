"""Read and validate staypoints and locations (trackintel column convention).

Staypoint CSV: one row per stay with the columns ``user_id``, ``location_id``, ``started_at``,
``finished_at`` (required) and optionally ``id``, ``is_activity``, ``lat``/``lon`` or a WKT
``geom``/``geometry`` point -- the file trackintel's ``write_staypoints_csv`` writes after
``create_activity_flag`` and ``generate_locations``.  Two kinds of rows are dropped, with one log
line counting them: DBSCAN noise (an empty ``location_id``: trackintel links no location to it)
and stays whose ``is_activity`` is false (MHSA keeps activity stays only).

Timestamps are ISO 8601 (``2021-10-01T07:30:00+07:00``, ``2021-10-01 07:30:00``).  Time
features use the *local wall-clock time* written in the file: a timestamp with a UTC offset keeps
its wall time (the offset is dropped), as the MHSA preprocessing does; with ``tz`` given, times are
converted to that zone instead (timestamps without offset are then taken as UTC).

Location CSV: ``id`` plus ``lat``/``lon`` or a WKT ``center``/``geom``/``geometry`` point (the
trackintel locations export, ``write_locations_csv``; with ``agg_level="dataset"`` trackintel
writes one row per user and location, so an id may repeat with the same center).

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
    "vocabulary_coordinates",
    "locations_to_vocabulary",
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


def _show(value) -> str:
    """A cell for an error message: numpy scalars shown as plain Python values (``5.5``, not
    ``np.float64(5.5)``), text quoted."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _int_column(
    df: pd.DataFrame, col: str, source: str, rows: np.ndarray | None = None
) -> np.ndarray:
    """Return ``df[col]`` as int64, raising on missing, non-numeric or non-integer values.

    ``rows[i]`` is the position of row ``i`` in the file (default ``i``), for line numbers.
    """
    raw = df[col]
    rows = np.arange(len(df)) if rows is None else rows
    num = pd.to_numeric(raw, errors="coerce")
    bad = np.nonzero((num.isna() | (num != np.floor(num))).to_numpy())[0]
    if len(bad):
        vals = ", ".join(_show(raw.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(
            f"{source}: column {col!r} must hold integers; {_lines(rows[bad])}: {vals}"
        )
    out = num.to_numpy().astype(np.int64)
    neg = np.nonzero(out < 0)[0]
    if len(neg):
        raise DataFormatError(
            f"{source}: column {col!r} has negative ids (out of range); {_lines(rows[neg])}: "
            + ", ".join(str(out[i]) for i in neg[:_SHOW])
        )
    return out


# how trackintel (a bool column), pandas and hand-written files spell an activity flag
_TRUE = {"true", "1", "1.0", "yes", "t"}
_FALSE = {"false", "0", "0.0", "no", "f"}


def _activity_flags(raw: pd.Series, source: str) -> np.ndarray:
    """``is_activity`` as a bool array; raise on a value that is neither true nor false."""
    if raw.dtype == bool:
        return raw.to_numpy()
    text = raw.astype(str).str.strip().str.lower()
    is_true, is_false = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()
    bad = np.nonzero(~(is_true | is_false))[0]
    if len(bad):
        raise DataFormatError(
            f"{source}: column 'is_activity' must hold True/False; {_lines(bad)}: "
            + ", ".join(_show(raw.iloc[i]) for i in bad[:_SHOW])
        )
    return is_true


def _is_empty(raw: pd.Series) -> np.ndarray:
    """Missing cells: NaN/None/pd.NA or blank text (how a CSV spells trackintel's <NA>)."""
    return (raw.isna() | raw.astype(str).str.strip().isin(["", "<NA>", "nan", "NaN"])).to_numpy()


def _parse_times(
    raw: pd.Series, col: str, source: str, tz: str | None, rows: np.ndarray | None = None
) -> pd.Series:
    """Parse a timestamp column to naive local wall-clock datetimes; raise on unparseable cells."""
    rows = np.arange(len(raw)) if rows is None else rows
    missing = np.nonzero(raw.isna().to_numpy())[0]
    if len(missing):
        raise DataFormatError(f"{source}: column {col!r} is empty on {_lines(rows[missing])}")
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
        vals = ", ".join(_show(text.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(
            f"{source}: column {col!r} has unparseable timestamps on {_lines(rows[bad])}: {vals}"
        )
    return ts.astype("datetime64[ns]")


def _points_from_wkt(
    raw: pd.Series, col: str, source: str, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Parse WKT ``POINT (lon lat)`` strings (or shapely-like points with ``.x``/``.y``, as in a
    trackintel GeoDataFrame) into (lat, lon) arrays."""
    if raw.dtype == object and len(raw) and all(hasattr(p, "x") for p in raw.iloc[:1]):
        raw = raw.map(lambda p: f"POINT ({p.x!r} {p.y!r})" if hasattr(p, "x") else str(p))
    m = raw.astype(str).str.extract(_WKT_POINT)
    bad = np.nonzero(m[0].isna().to_numpy())[0]
    if len(bad):
        vals = ", ".join(_show(raw.iloc[i]) for i in bad[:_SHOW])
        raise DataFormatError(
            f"{source}: column {col!r} must hold WKT points 'POINT (lon lat)'; "
            f"{_lines(rows[bad])}: {vals}"
        )
    return m[1].astype(float).to_numpy(), m[0].astype(float).to_numpy()


def _coords(
    df: pd.DataFrame, source: str, wkt_cols: tuple[str, ...], rows: np.ndarray | None = None
):
    """Return (lat, lon) float arrays from lat/lon or a WKT column, or None if neither exists."""
    rows = np.arange(len(df)) if rows is None else rows
    if "lat" in df.columns and "lon" in df.columns:
        out = []
        for col in ("lat", "lon"):
            v = pd.to_numeric(df[col], errors="coerce")
            bad = np.nonzero(v.isna().to_numpy())[0]
            if len(bad):
                raise DataFormatError(
                    f"{source}: column {col!r} must hold numbers; {_lines(rows[bad])}: "
                    + ", ".join(_show(df[col].iloc[i]) for i in bad[:_SHOW])
                )
            out.append(v.to_numpy(dtype=np.float64))
        lat, lon = out
        bad = np.nonzero((np.abs(lat) > 90) | (np.abs(lon) > 180))[0]
        if len(bad):
            raise DataFormatError(
                f"{source}: lat/lon out of range (|lat| <= 90, |lon| <= 180) on {_lines(rows[bad])}"
            )
        return lat, lon
    for col in wkt_cols:
        if col in df.columns:
            return _points_from_wkt(df[col], col, source, rows)
    return None


def validate_staypoints(
    df: pd.DataFrame,
    source: str = "<DataFrame>",
    tz: str | None = None,
    activities_only: bool = True,
) -> pd.DataFrame:
    """Check and normalise a raw staypoint table.

    Rows with an empty ``location_id`` (DBSCAN noise: trackintel links no location to them) are
    dropped, and so are rows whose ``is_activity`` is false when that column exists and
    ``activities_only`` is true (MHSA predicts the next *activity* location).  One INFO line on the
    ``hsoftmax.data`` logger counts both.

    Args:
        df: raw table with at least :data:`REQUIRED_COLUMNS`; extra columns are ignored except
            optional ``is_activity``, ``lat``/``lon`` or ``geom``/``geometry`` (WKT points).  A
            trackintel staypoints (Geo)DataFrame works as is.
        source: name used in error messages (the file path).
        tz: time zone to convert timestamps to before taking wall-clock time (timestamps without
            an offset count as UTC); ``None`` keeps the wall time written in the file.
        activities_only: drop stays whose ``is_activity`` is false.

    Returns:
        A new DataFrame with columns ``user_id``, ``location_id`` (int64), ``started_at``,
        ``finished_at`` (naive ``datetime64[ns]``, local time) and ``lat``/``lon`` when present,
        sorted by user and start time; the original row position is kept in ``row``.

    Raises:
        DataFormatError: on missing columns, non-integer or negative ids, unparseable timestamps,
            a stay that finishes before it starts, an ``is_activity`` value that is not
            true/false, or when no stay is left after dropping.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"{source}: missing required column(s) {missing}; found {list(df.columns)}"
        )
    noise = _is_empty(df["location_id"])
    inactive = np.zeros(len(df), dtype=bool)
    if activities_only and "is_activity" in df.columns:
        inactive = ~_activity_flags(df["is_activity"], source)
    keep = ~(noise | inactive)
    if not keep.all():
        logger.info(
            "%s: dropped %d of %d stays: %d DBSCAN noise (empty location_id), %d more not "
            "activities (is_activity false)",
            source,
            int((~keep).sum()),
            len(df),
            int(noise.sum()),
            int((inactive & ~noise).sum()),
        )
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise DataFormatError(
            f"{source}: no staypoint left: {int(noise.sum())} of {len(df)} have an empty "
            f"location_id (DBSCAN noise), {int((inactive & ~noise).sum())} more are not "
            "activities (is_activity false)"
        )
    kept = df.iloc[rows]
    out = pd.DataFrame(
        {
            "row": rows.astype(np.int64),
            "user_id": _int_column(kept, "user_id", source, rows),
            "location_id": _int_column(kept, "location_id", source, rows),
            "started_at": _parse_times(
                kept["started_at"], "started_at", source, tz, rows
            ).to_numpy(),
            "finished_at": _parse_times(
                kept["finished_at"], "finished_at", source, tz, rows
            ).to_numpy(),
        }
    )
    neg = np.nonzero((out["finished_at"] < out["started_at"]).to_numpy())[0]
    if len(neg):
        raise DataFormatError(
            f"{source}: negative duration (finished_at before started_at) on {_lines(rows[neg])}"
        )
    coords = _coords(kept, source, ("geom", "geometry"), rows)
    if coords is not None:
        out["lat"], out["lon"] = coords
    return out.sort_values(["user_id", "started_at", "row"], kind="stable").reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV as text cells; ``,`` or ``;`` separated (trackintel's own test files use ``;``)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not a text (UTF-8) CSV file") from None
    sep = ";" if header.count(";") > header.count(",") else ","
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=True, sep=sep)
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}: file is empty (expected a header line)") from None
    except pd.errors.ParserError as e:
        raise DataFormatError(f"{path}: not a readable CSV file: {e}") from None


def read_staypoints(
    path: str | os.PathLike, tz: str | None = None, activities_only: bool = True
) -> pd.DataFrame:
    """Read a staypoint CSV (trackintel columns) and validate it with :func:`validate_staypoints`
    (which drops DBSCAN noise and non-activity stays, logging how many).

    Returns the normalised DataFrame (see :func:`validate_staypoints`).
    """
    path = Path(path)
    raw = _read_csv(path)
    return validate_staypoints(raw, source=str(path), tz=tz, activities_only=activities_only)


def read_locations(path: str | os.PathLike) -> pd.DataFrame:
    """Read a location CSV: ``id`` plus ``lat``/``lon`` or a WKT ``center``/``geom``/``geometry``.

    Reads trackintel's ``write_locations_csv`` output as written (``id``, ``user_id``, ``center``,
    ``extent``) -- with ``agg_level="dataset"`` it holds one row per user and location, so an id
    may repeat; repeats with the same center are merged -- and plain ``id,lat,lon`` tables.
    Extra columns are ignored.

    Returns a DataFrame with columns ``id`` (int64), ``lat``, ``lon`` (float64), one row per id,
    sorted by id.  Raises :class:`DataFormatError` on a missing/invalid column or an id repeated
    with different coordinates.
    """
    path = Path(path)
    raw = _read_csv(path)
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
    out = pd.DataFrame({"id": ids, "lat": coords[0], "lon": coords[1]})
    dup = out["id"].duplicated().to_numpy()
    if dup.any():
        first = out.drop_duplicates("id").set_index("id")
        moved = np.flatnonzero(
            dup
            & (
                (first.loc[ids, "lat"].to_numpy() != out["lat"].to_numpy())
                | (first.loc[ids, "lon"].to_numpy() != out["lon"].to_numpy())
            )
        )
        if len(moved):
            raise DataFormatError(
                f"{src}: duplicate location id with different coordinates on {_lines(moved)}"
            )
        out = out[~dup]
    return out.sort_values("id").reset_index(drop=True)


def locations_to_vocabulary(locations: pd.DataFrame, location_ids: np.ndarray) -> pd.DataFrame:
    """Match a location table (``id``, ``lat``, ``lon`` in original ids, as
    :func:`read_locations` returns) to a vocabulary.

    ``location_ids[k]`` is the original id of encoded id ``k`` (-1 where none, as for padding and
    unseen).  Returns ``loc``, ``id``, ``lat``, ``lon`` for the encoded ids ``2..V-1``; ids the
    table lacks get NaN coordinates (:func:`vocabulary_coordinates` fills them with the mean).
    """
    ids = np.asarray(location_ids, dtype=np.int64)[2:]
    table = locations.drop_duplicates("id").set_index("id")
    known = np.isin(ids, table.index.to_numpy()) & (ids >= 0)
    lat = np.full(len(ids), np.nan)
    lon = np.full(len(ids), np.nan)
    lat[known] = table.loc[ids[known], "lat"].to_numpy()
    lon[known] = table.loc[ids[known], "lon"].to_numpy()
    return pd.DataFrame(
        {"loc": np.arange(2, len(ids) + 2, dtype=np.int64), "id": ids, "lat": lat, "lon": lon}
    )


def vocabulary_coordinates(
    locations: pd.DataFrame, n_locations: int, source: str = ""
) -> np.ndarray:
    """(V, 2) lat/lon per encoded location id, every id ``0..V-1`` included.

    Args:
        locations: vocabulary table with columns ``loc`` (encoded id), ``lat``, ``lon`` (NaN
            where unknown), as on :class:`~hsoftmax.data.samples.MobilityData`.
        n_locations: vocabulary size ``V`` (0 = padding, 1 = unseen).
        source: name used in the error message.

    Ids without coordinates (padding, unseen, locations the table lacks) get the mean of the known
    coordinates: they then sit in a central cluster, and a tree built from the result has exactly
    ``V`` leaves, one per model class.

    Raises:
        DataFormatError: when no location has coordinates (use a tree that needs none).
    """
    coords = np.full((n_locations, 2), np.nan)
    if len(locations) and {"loc", "lat", "lon"} <= set(locations.columns):
        ids = locations["loc"].to_numpy(np.int64)
        bad = np.flatnonzero((ids < 0) | (ids >= n_locations))
        if len(bad):
            raise DataFormatError(
                f"{source}: location table row {int(bad[0])}: loc {int(ids[bad[0]])} is not an "
                f"encoded id in [0, {n_locations})"
            )
        coords[ids] = locations[["lat", "lon"]].to_numpy(np.float64)
    known = np.isfinite(coords).all(axis=1)
    if not known.any():
        where = f"{source}: " if source else ""
        raise DataFormatError(
            f"{where}no location has coordinates (a trackintel locations.csv beside the data "
            "provides them); use a tree that needs none (huffman, balanced, cooccurrence)"
        )
    coords[~known] = coords[known].mean(axis=0)
    return coords


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
