"""Reading the inputs of the tree builders from files: counts, per-leaf features, transitions.

Counts are ``.npy`` or text/CSV with one number per line (a header line is allowed); features are
``.npy`` (V, F) or CSV (a header line is allowed; ``columns`` picks named columns); transitions are
a scipy.sparse ``.npz`` (``scipy.sparse.save_npz``) or a dense ``.npy``. CSV goes through pandas,
the reader the data side uses. Every error is a :class:`InputError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["InputError", "read_counts", "read_features", "read_transitions"]


class InputError(ValueError):
    """A bad input file or argument; the message names it."""


def read_counts(path: str | Path) -> np.ndarray:
    """(V,) counts from ``.npy`` or a text file with one number per line."""
    arr = _read_table(path)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(f"{path}: counts must be one number per line, got shape {arr.shape}")
    return arr


def read_features(path: str | Path, columns: list[str] | None = None) -> np.ndarray:
    """(V, F) features from ``.npy`` or CSV (with ``columns`` picked by header name)."""
    arr = _read_table(path, columns)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InputError(f"{path}: features must be a (V, F) table, got shape {arr.shape}")
    return arr


def read_transitions(path: str | Path):
    """(V, V) transition counts from a scipy.sparse ``.npz`` or a dense ``.npy``."""
    import scipy.sparse as sp

    path = _existing(path)
    try:
        if path.suffix == ".npz":
            return sp.load_npz(path)
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{path}: not a readable transition matrix ({e})") from e
    raise InputError(f"{path}: transitions must be a scipy.sparse .npz or a dense .npy file")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def _read_table(path: str | Path, columns: list[str] | None = None) -> np.ndarray:
    path = _existing(path)
    if path.suffix == ".npy":
        if columns:
            raise InputError(f"{path}: --columns needs a CSV file with a header line")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"{path}: must hold numbers, got dtype {arr.dtype}")
        return arr
    return _read_csv(path, columns)


def _read_csv(path: Path, columns: list[str] | None) -> np.ndarray:
    import pandas as pd

    try:
        first = pd.read_csv(path, header=None, nrows=1, skip_blank_lines=True)
        numeric_first = pd.to_numeric(first.iloc[0], errors="coerce").notna().all()
        df = pd.read_csv(path, header=None if numeric_first else 0, skip_blank_lines=True)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text/CSV file (use .npy for binary arrays)") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as e:
        raise InputError(f"{path}: not a readable CSV table ({e})") from None
    if columns:
        if numeric_first:
            raise InputError(f"{path}: --columns {','.join(columns)} needs a header line")
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise InputError(f"{path}: no column(s) {missing}; the header has {list(df.columns)}")
        df = df[columns]
    if df.empty:
        raise InputError(f"{path}: no data rows")
    values = df.apply(pd.to_numeric, errors="coerce")
    bad = values.isna() & df.notna()
    if bad.any(axis=None) or values.isna().any(axis=None):
        row = int(np.flatnonzero((bad | values.isna()).any(axis=1).to_numpy())[0])
        line = row + (1 if numeric_first else 2)
        raise InputError(f"{path}: line {line} is not numeric (or has missing cells)")
    return values.to_numpy(dtype=np.float64)
