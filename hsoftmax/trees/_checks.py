"""Argument checks and helpers shared by the tree builders."""

from __future__ import annotations

import math

import numpy as np
import torch

from hsoftmax.tree import one_dim_array

_EARTH_RADIUS_KM = 6371.0088


def _as_counts(counts, name: str) -> np.ndarray:
    w = one_dim_array(counts, name, "leaf", " (one count per leaf)")
    if w.dtype == bool or not (
        np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)
    ):
        raise TypeError(f"{name} must hold numbers, got dtype {w.dtype}")
    w = w.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {w[bad[0]]}: counts must be finite and >= 0")
    return w


def _as_features(features, coords: str | None) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must have shape (V, F) with V, F >= 1, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"features must hold numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"features[{r}, {c}] = {x[r, c]}: features must be finite")
    if coords is None or coords == "euclidean":
        return np.ascontiguousarray(x)
    if coords != "latlon":
        raise ValueError(f"coords must be None, 'euclidean' or 'latlon', got {coords!r}")
    if x.shape[1] != 2:
        raise ValueError(f"coords='latlon' needs features of shape (V, 2), got {x.shape}")
    return latlon_to_km(x[:, 0], x[:, 1])


def latlon_to_km(lat, lon) -> np.ndarray:
    """(V, 2) equirectangular projection in km around the mean position: ``x`` east, ``y`` north.

    Longitudes are unwrapped around their circular mean, so points on both sides of the
    antimeridian stay close. Accurate for regions of a few hundred km (cities, the DIY area).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if np.any(np.abs(lat) > 90):
        r = int(np.flatnonzero(np.abs(lat) > 90)[0])
        raise ValueError(f"latitude[{r}] = {lat[r]} is outside [-90, 90]")
    if np.any(np.abs(lon) > 180):
        r = int(np.flatnonzero(np.abs(lon) > 180)[0])
        raise ValueError(f"longitude[{r}] = {lon[r]} is outside [-180, 180]")
    rad = np.pi / 180.0
    lon0 = math.atan2(np.sin(lon * rad).mean(), np.cos(lon * rad).mean()) / rad
    dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
    lat0 = lat.mean()
    x = _EARTH_RADIUS_KM * math.cos(lat0 * rad) * dlon * rad
    y = _EARTH_RADIUS_KM * (lat - lat0) * rad
    return np.stack([x, y], axis=1)


def _as_adjacency(transitions):
    """Symmetric CSR ``T + T^T`` without its diagonal, validated."""
    import scipy.sparse as sp

    if isinstance(transitions, torch.Tensor):
        transitions = transitions.detach().cpu().numpy()
    t = sp.csr_matrix(transitions) if not sp.issparse(transitions) else transitions.tocsr()
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise ValueError(f"transitions must be a square (V, V) matrix with V >= 1, got {t.shape}")
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise TypeError(f"transitions must hold numbers, got dtype {t.dtype}")
    t = t.astype(np.float64)
    data = t.data
    if data.size and (not np.isfinite(data).all() or (data < 0).any()):
        raise ValueError("transitions must be finite and >= 0")
    a = (t + t.T).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def _parse_branching(branching) -> tuple[int, ...] | None:
    """``"binary"`` -> None; an int or ints >= 2 -> a tuple."""
    if isinstance(branching, str):
        if branching == "binary":
            return None
        raise ValueError(
            f"branching must be 'binary', an int or a sequence of ints, got {branching!r}"
        )
    if isinstance(branching, int | np.integer) and not isinstance(branching, bool):
        branching = (branching,)
    try:
        levels = tuple(branching)
    except TypeError:
        raise TypeError(
            f"branching must be 'binary', an int or a sequence of ints, got {branching!r}"
        ) from None
    for k in levels:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
            raise ValueError(f"branching factors must be ints >= 2, got {levels!r}")
    return tuple(int(k) for k in levels)


def _int_at_least(value, low: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # delay: the bar only appears for builds that take more than a second
    return tqdm(total=total, desc=desc, unit="leaf", delay=1.0, disable=not enabled, leave=False)
