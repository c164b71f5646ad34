"""Hierarchical balanced k-means over per-leaf features (e.g. location coordinates)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from hsoftmax.tree import Tree
from hsoftmax.trees._checks import _as_features, _int_at_least, _parse_branching, _progress


def from_features(
    features,
    branching: Sequence[int] | int | str = (128,),
    seed: int = 0,
    *,
    coords: str | None = None,
    max_children: int | None = None,
    max_fraction: float = 0.75,
    n_init: int = 1,
    progress: bool = False,
) -> Tree:
    """Hierarchical balanced k-means over per-leaf features (coordinates or learned embeddings).

    ``branching = (k1, k2, ...)`` splits the root into ``k1`` clusters, each of those into ``k2``,
    and so on; the clusters of the last level hold leaves. ``(128,)`` is the two-level
    "128 clusters -> locations" tree; ``()`` a single flat softmax. ``"binary"`` splits every node
    in two (2-means) until single leaves remain.

    Balance. k-way levels use scikit-learn ``KMeans``; a cluster larger than allowed is re-split
    into ``ceil(size / mean size)`` sibling clusters by k-means (by equal chunks along its
    principal axis if k-means cannot separate its points), and a cluster of one leaf becomes a
    direct child of its parent. A last-level cluster holds at most ``max_children`` leaves
    (default ``4 x`` the mean ``V / prod(branching)``); clusters of earlier levels at most the same
    multiple of their level's mean. A node split into ``k`` clusters gets about ``k`` children
    (a few more where oversized clusters were re-split); a node with at most ``k`` leaves left
    takes them all as children.

    Binary splits run a small Lloyd 2-means in NumPy (scikit-learn's per-call overhead, ~2 ms,
    would dominate the V - 1 splits). A 2-means split is a threshold on the projection onto the
    line between the two centres, so it is taken as a cut in the sorted projection; the cut is
    clamped so that neither side gets more than ``max_fraction`` of the points (keeping the depth
    at most ``log(V) / log(1 / max_fraction)``), and a degenerate split (identical points) falls
    back to the median of the principal axis. Every split therefore makes two non-empty parts and
    the recursion always ends.

    Args:
        features: (V, F) finite floats, one row per leaf.
        branching: ints >= 2 per level, one int, or ``"binary"``.
        seed: seeds k-means initialisation; the same seed gives the same tree.
        coords: ``"latlon"`` if ``features`` are (latitude, longitude) in degrees: they are
            projected to km (equirectangular around the mean position, longitudes unwrapped
            around the antimeridian) so k-means measures distance on the ground. ``None``: use
            the features as given (Euclidean).
        max_children: most leaves in a last-level cluster (>= 2); see Balance.
        max_fraction: binary splits only: the largest share of a node's points one side may
            take, in [0.5, 1).
        n_init: k-means restarts per k-way split (the best inertia is kept).
        progress: show a tqdm progress bar (it appears only if the build takes over a second).

    Returns:
        The tree; internal ids are assigned top-down in depth-first order (the root is ``V``).
    """
    x = _as_features(features, coords)
    levels = _parse_branching(branching)
    seed = _int_at_least(seed, 0, "seed")
    n_init = _int_at_least(n_init, 1, "n_init")
    if not 0.5 <= float(max_fraction) < 1.0:
        raise ValueError(f"max_fraction must be in [0.5, 1), got {max_fraction}")
    v = x.shape[0]
    if levels is None:
        ratio = cap_last = 0.0
    else:
        mean_last = max(1.0, v / math.prod(levels)) if levels else float(v)
        if max_children is None:
            max_children = max(2, math.ceil(4 * mean_last))
        cap_last = _int_at_least(max_children, 2, "max_children")
        ratio = max(1.0, cap_last / mean_last)
    rng = np.random.default_rng(seed)
    builder = _TreeBuilder(v)
    if v == 1:
        return builder.tree()
    bar = _progress(v, progress, "k-means tree")
    # depth-first with an explicit stack: (leaf ids, level, parent node id); ids are made on pop
    stack: list[tuple[np.ndarray, int, int]] = [(np.arange(v), 0, -1)]
    while stack:
        idx, level, parent = stack.pop()
        node = builder.add_internal(parent)
        if levels is None:
            groups = _binary_split(x[idx], rng, float(max_fraction))
        elif level == len(levels) or idx.size <= levels[level]:
            groups = None  # last level (or too few points to split): the leaves are children
        else:
            k = levels[level]
            last = level + 1 == len(levels)
            cap = cap_last if last else max(1, math.ceil(ratio * idx.size / k))
            groups = _kway_split(x[idx], k, cap, rng, n_init)
        if groups is None:
            builder.attach_leaves(idx, node)
            bar.update(idx.size)
            continue
        pending = []
        for g in groups:
            members = idx[g]
            if members.size == 1:
                builder.attach_leaves(members, node)
                bar.update(1)
            else:
                pending.append((members, level + 1, node))
        stack.extend(reversed(pending))  # pop in group order
    bar.close()
    return builder.tree()


class _TreeBuilder:
    """Collects parent links; internal ids are V, V+1, ... in creation order."""

    def __init__(self, num_leaves: int):
        self.v = num_leaves
        self.leaf_parent = np.full(num_leaves, -1, dtype=np.int64)
        self.internal_parent: list[int] = []

    def add_internal(self, parent: int) -> int:
        self.internal_parent.append(parent)
        return self.v + len(self.internal_parent) - 1

    def attach_leaves(self, leaves: np.ndarray, parent: int) -> None:
        self.leaf_parent[leaves] = parent

    def tree(self) -> Tree:
        parents = np.concatenate([self.leaf_parent, np.asarray(self.internal_parent, np.int64)])
        return Tree.from_parents(parents, num_leaves=self.v)


def _kway_split(
    x: np.ndarray, k: int, cap: int, rng: np.random.Generator, n_init: int
) -> list[np.ndarray]:
    """Split the rows of ``x`` into >= 2 non-empty groups of at most ``cap`` rows (row indices),
    about ``k`` of them: k-means, then oversized groups re-split into siblings."""
    n = x.shape[0]
    if n <= k:
        return [np.array([i]) for i in range(n)]
    labels = _kmeans_labels(x, k, rng, n_init)
    groups = _groups_of(labels)
    if len(groups) < 2:  # all points identical (or k-means collapsed): equal chunks
        groups = _chunks_along_axis(x, k)
    target = n / k
    out: list[np.ndarray] = []
    for g in groups:
        if g.size <= cap:
            out.append(g)
            continue
        pieces = max(2, math.ceil(g.size / target))
        out.extend(g[sub] for sub in _kway_split(x[g], pieces, cap, rng, n_init))
    return out


def _kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    state = int(rng.integers(2**31 - 1))
    with warnings.catch_warnings():
        # duplicate points give fewer distinct clusters than k; we handle that ourselves
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=n_init, random_state=state).fit(x)
    return km.labels_


def _groups_of(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices per label, labels in increasing order, rows in increasing order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    cuts = np.flatnonzero(np.diff(sorted_labels)) + 1
    return [g for g in np.split(order, cuts) if g.size]


def _principal_axis(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    if not np.any(centred):
        return np.zeros(x.shape[1])
    # F x F covariance: cheap for any F we meet (coordinates, embeddings of a few hundred)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    return vecs[:, -1]


def _chunks_along_axis(x: np.ndarray, k: int) -> list[np.ndarray]:
    order = np.argsort(x @ _principal_axis(x), kind="stable")
    return [c for c in np.array_split(order, min(k, x.shape[0])) if c.size]


def _binary_split(x: np.ndarray, rng: np.random.Generator, max_fraction: float) -> list:
    """Two non-empty groups of row indices: the 2-means cut, clamped to ``max_fraction``."""
    n = x.shape[0]
    if n == 2:
        return [np.array([0]), np.array([1])]
    fit = _two_means(x, rng)
    if fit is None:  # identical points or a collapsed start: median of the principal axis
        direction, threshold = _principal_axis(x), None
    else:
        direction, threshold = fit
    proj = x @ direction
    order = np.argsort(proj, kind="stable")
    # the 2-means assignment is "proj <= threshold" (side 0): a prefix of the sorted order
    left = n // 2 if threshold is None else int(np.searchsorted(proj[order], threshold, "right"))
    hi = max(1, min(n - 1, math.floor(max_fraction * n)))
    left = min(max(left, n - hi), hi)
    return [order[:left], order[left:]]


def _two_means(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float] | None:
    """Lloyd's 2-means from a k-means++ start, as the boundary ``x @ w > t`` of side 1;
    None if the points cannot be separated."""
    n = x.shape[0]
    c0 = x[int(rng.integers(n))]
    d2 = ((x - c0) ** 2).sum(axis=1)
    total = d2.sum()
    if total <= 0:
        return None
    c1 = x[int(rng.choice(n, p=d2 / total))]
    side = None
    for _ in range(30):
        w, t = c1 - c0, 0.5 * (c1 @ c1 - c0 @ c0)
        new_side = x @ w > t
        if side is not None and np.array_equal(new_side, side):
            break
        side = new_side
        ones = int(side.sum())
        if ones == 0 or ones == n:
            return None
        c1 = x[side].mean(axis=0)
        c0 = x[~side].mean(axis=0)
    else:
        w, t = c1 - c0, 0.5 * (c1 @ c1 - c0 @ c0)
    return (w, float(t)) if np.any(w) else None
