"""Data-driven trees: Huffman, hierarchical k-means, co-occurrence clusters, and tree statistics.

Every builder returns an :class:`~hsoftmax.Tree` over leaves ``0 .. V-1`` and is deterministic: the
same inputs and ``seed`` give the same ``tree.parents`` (on the same library versions).

Dimension letters (see :mod:`hsoftmax.tree`): V leaves, F features per leaf, N nodes, k the number
of clusters a node is split into.

Cost model. The kernel evaluates, at every internal node on an example's path, one dot product per
child except the first (whose logit is fixed at 0), so an example for leaf ``y`` costs
``sum over the path of (c_n - 1)`` dot products -- not its path length: one 128-way node costs 127.
:func:`tree_stats` reports both.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from hsoftmax.tree import Tree

__all__ = [
    "bias_from_log_prob",
    "from_cooccurrence",
    "from_features",
    "huffman",
    "latlon_to_km",
    "retree_weights",
    "spectral_embedding",
    "tree_stats",
]

_EARTH_RADIUS_KM = 6371.0088


# ---------------------------------------------------------------------------------------- Huffman


def huffman(counts, arity: int = 2) -> Tree:
    """k-ary Huffman tree over leaf frequencies (word2vec / fastText style).

    Frequent leaves get short paths: the tree minimises the expected path length
    ``sum_y p_y * depth(y)`` among all trees whose internal nodes have at most ``arity`` children.
    For ``arity = 2`` that expectation is within 1 of the entropy bound ``H(p)`` bits.

    The classic k-ary algorithm pads the leaves with zero-count dummies until
    ``(V - 1) mod (k - 1) == 0``; the dummies would all be merged first, so this implementation
    merges only ``2 + (V - 2) mod (k - 1)`` real items first instead -- the same tree minus the
    dummies, with no internal node left with fewer than 2 children. Every later merge takes
    ``arity`` items.

    Args:
        counts: (V,) non-negative finite counts or frequencies; zeros are allowed.
        arity: the most children of an internal node, >= 2.

    Returns:
        A tree with leaf ``y`` = ``counts[y]``; internal ids are assigned bottom-up in merge order,
        so the root is node ``N - 1``.

    Determinism: ties are broken by (count, creation order) -- leaves in id order before any
    merged node, merged nodes in the order they were made -- as a heap keyed that way would. The
    implementation is the O(V) two-queue form of that heap after one stable sort.
    """
    w = _as_counts(counts, "counts")
    arity = _int_at_least(arity, 2, "arity")
    v = w.size
    if v == 1:
        return Tree.from_parents([-1], num_leaves=1)
    order = np.argsort(w, kind="stable")  # leaves by (count, id)
    leaf_w = w[order].tolist()
    leaf_id = order.tolist()
    num_internal = _huffman_num_internal(v, arity)
    parents = np.full(v + num_internal, -1, dtype=np.int64)
    merged_w: deque[float] = deque()  # merged nodes, made in non-decreasing weight order
    merged_id: deque[int] = deque()
    li = 0
    take = 2 + (v - 2) % (arity - 1)
    for node in range(v, v + num_internal):
        total = 0.0
        for _ in range(take):
            # the leaf wins a tie: it was created before every merged node
            if li < v and (not merged_w or leaf_w[li] <= merged_w[0]):
                total += leaf_w[li]
                parents[leaf_id[li]] = node
                li += 1
            else:
                total += merged_w.popleft()
                parents[merged_id.popleft()] = node
        merged_w.append(total)
        merged_id.append(node)
        take = arity
    return Tree.from_parents(parents, num_leaves=v)


def _huffman_num_internal(v: int, arity: int) -> int:
    # the first merge removes take - 1 items, each later one arity - 1, until one item is left
    first = 2 + (v - 2) % (arity - 1)
    return 1 + (v - first) // (arity - 1)


# ------------------------------------------------------------------------- hierarchical k-means


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


# --------------------------------------------------------------------------- co-occurrence


def from_cooccurrence(
    transitions,
    branching: Sequence[int] | int | str = (150,),
    seed: int = 0,
    *,
    dim: int | None = None,
    max_children: int | None = None,
    max_fraction: float = 0.75,
    progress: bool = False,
) -> Tree:
    """Clusters of leaves that follow each other: spectral embedding of the transition graph,
    then the balanced hierarchical k-means of :func:`from_features` on it.

    The graph is ``A = T + T^T`` with the diagonal dropped (staying put says nothing about which
    places belong together). Its embedding is the top ``dim`` eigenvectors of the regularised
    normalised adjacency ``D_t^{-1/2} A D_t^{-1/2}`` with ``D_t = D + tau I`` and ``tau`` the mean
    degree (Qin & Rohe 2013): the regulariser keeps low-degree leaves from dominating, and a leaf
    with no transitions embeds at the origin, so isolated leaves are clustered together (and split
    into clusters of at most ``max_children``) instead of being dropped. Rows are normalised to unit
    length (Ng, Jordan & Weiss) before k-means. The eigenvectors come from a seeded randomized SVD
    of the shifted, positive semi-definite ``(I + N) / 2``, which has the same eigenvectors.

    Args:
        transitions: (V, V) non-negative counts, ``transitions[a, b]`` = moves from ``a`` to
            ``b``; a scipy.sparse matrix or a dense array.
        branching, seed, max_children, max_fraction, progress: as in :func:`from_features`.
        dim: embedding dimension; default ``min(V - 1, 64)``.

    Returns:
        The tree (deterministic under ``seed``).
    """
    adj = _as_adjacency(transitions)
    v = adj.shape[0]
    seed = _int_at_least(seed, 0, "seed")
    if v <= 2:
        return from_features(np.zeros((v, 1)), branching, seed, max_children=max_children)
    dim = min(v - 1, 64) if dim is None else _int_at_least(dim, 1, "dim")
    emb = spectral_embedding(adj, dim, seed)
    return from_features(
        emb,
        branching,
        seed,
        max_children=max_children,
        max_fraction=max_fraction,
        progress=progress,
    )


def spectral_embedding(adjacency, dim: int, seed: int = 0) -> np.ndarray:
    """(V, dim) row-normalised embedding of a symmetric non-negative adjacency matrix; see
    :func:`from_cooccurrence`. Rows of isolated nodes are zero."""
    import scipy.sparse as sp
    from sklearn.utils.extmath import randomized_svd

    a = sp.csr_matrix(adjacency, dtype=np.float64)
    v = a.shape[0]
    dim = min(dim, v)
    degree = np.asarray(a.sum(axis=1)).ravel()
    tau = degree.mean() if degree.any() else 1.0
    scale = 1.0 / np.sqrt(degree + tau)
    norm = sp.diags(scale) @ a @ sp.diags(scale)
    shifted = (0.5 * (sp.identity(v, format="csr") + norm)).tocsr()
    u, s, _ = randomized_svd(
        shifted, n_components=dim, n_oversamples=max(10, dim // 2), n_iter=7, random_state=seed
    )
    # randomized_svd fixes signs (svd_flip), so the embedding is reproducible. Each eigenvector
    # is weighted by its eigenvalue of N (2s - 1, floored at 0), as in a diffusion map: directions
    # of within-cluster noise (eigenvalues near 0) fade instead of swamping the cluster structure.
    emb = u * np.clip(2.0 * s - 1.0, 0.0, None)
    emb[degree == 0] = 0.0
    length = np.linalg.norm(emb, axis=1, keepdims=True)
    np.divide(emb, length, out=emb, where=length > 0)
    return emb


# ------------------------------------------------------------------------------- statistics


def tree_stats(tree: Tree, counts=None) -> dict:
    """Shape and cost of a tree, optionally under leaf frequencies.

    Keys (path length = internal nodes on a leaf's path; dot products = ``sum (c_n - 1)`` over
    them, the kernel's work per example):

    * ``num_leaves``, ``num_nodes``, ``num_internal``, ``depth`` (= ``max_path_length``)
    * ``depth_histogram``: list, entry ``d`` = number of leaves at depth ``d``
    * ``branching_histogram``: dict ``{number of children: number of internal nodes}``
    * ``mean_path_length``, ``max_path_length``: over leaves, uniformly
    * ``mean_dot_products``, ``max_dot_products``: the same for dot products
    * with ``counts`` (V non-negative, not all zero): ``expected_path_length``,
      ``expected_dot_products`` (weighted by ``counts / counts.sum()``), ``entropy_bits`` of that
      distribution (the binary Huffman bound: ``entropy <= expected_path_length < entropy + 1``).
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an hsoftmax.Tree, got {type(tree).__name__}")
    v = tree.num_leaves
    path_len, path_dots = _leaf_costs(tree)
    child_counts = np.diff(tree.child_ptr.numpy())
    hist_keys, hist_vals = np.unique(child_counts, return_counts=True)
    stats = {
        "num_leaves": v,
        "num_nodes": tree.num_nodes,
        "num_internal": tree.num_nodes - v,
        "depth": int(path_len.max()),
        "depth_histogram": np.bincount(path_len).tolist(),
        "branching_histogram": {int(k): int(c) for k, c in zip(hist_keys, hist_vals, strict=True)},
        "mean_path_length": float(path_len.mean()),
        "max_path_length": int(path_len.max()),
        "mean_dot_products": float(path_dots.mean()),
        "max_dot_products": int(path_dots.max()),
    }
    if counts is not None:
        w = _as_counts(counts, "counts")
        if w.size != v:
            raise ValueError(f"counts must have length V = {v}, got {w.size}")
        total = w.sum()
        if total <= 0:
            raise ValueError("counts must not be all zero")
        p = w / total
        nz = p[p > 0]
        stats["expected_path_length"] = float(p @ path_len)
        stats["expected_dot_products"] = float(p @ path_dots)
        stats["entropy_bits"] = float(-(nz * np.log2(nz)).sum())
    return stats


def _leaf_costs(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """(V,) path length and dot products of every leaf, from the compiled paths."""
    c = tree.compiled()
    rows_per_node = np.diff(c.node_row_ptr.numpy().astype(np.int64))
    depth = tree.leaf_depth.numpy()
    per_entry = rows_per_node[c.path_node.numpy()]
    leaf_of_entry = np.repeat(np.arange(tree.num_leaves), depth)
    dots = np.bincount(leaf_of_entry, weights=per_entry, minlength=tree.num_leaves)
    return depth, dots.astype(np.int64)


# -------------------------------------------------------------------------- re-treeing a head


def bias_from_log_prob(tree: Tree, leaf_log_prob) -> torch.Tensor:
    """(V - 1,) bias that, with zero weights, makes the head's distribution exactly
    ``softmax(leaf_log_prob)`` for every hidden state.

    At internal node ``n`` the logit of child ``k`` is ``S(c_k) - S(c_0)``, where ``S(c)`` is
    the log-sum-exp of ``leaf_log_prob`` over the leaves below ``c``: then ``p(c_k | n)`` is the
    share of ``n``'s probability mass under ``c_k``, and the product along a path is the leaf's
    probability. A leaf with ``-inf`` log-probability is floored at 30 nats below the least
    likely other leaf, so every logit stays finite and trainable. Computed in float64.
    """
    lp = torch.as_tensor(leaf_log_prob, dtype=torch.float64).detach().cpu().reshape(-1)
    v = tree.num_leaves
    if lp.numel() != v:
        raise ValueError(f"leaf_log_prob must have V = {v} entries, got {lp.numel()}")
    if torch.isnan(lp).any() or torch.isposinf(lp).any():
        raise ValueError("leaf_log_prob must not contain NaN or +inf")
    if v == 1:
        return torch.zeros(0, dtype=torch.float64)
    finite = torch.isfinite(lp)
    if not finite.any():
        raise ValueError("leaf_log_prob must have at least one finite entry")
    if v == 1:
        return torch.zeros(0, dtype=torch.float64)
    # -inf leaves get a floor far below the rest, so every logit stays finite
    lp = torch.clamp(lp, min=float(lp[finite].min()) - 30.0).numpy()
    lp = lp - np.logaddexp.reduce(lp)
    parents = tree.parents.numpy()
    mass = np.full(parents.size, -np.inf)  # S(node): log of the probability below node
    mass[:v] = lp
    height = _node_height(parents, v)
    for h in range(1, int(height.max()) + 1):
        kids = np.flatnonzero(height[parents.clip(min=0)] == h)
        kids = kids[parents[kids] >= 0]
        np.logaddexp.at(mass, parents[kids], mass[kids])
    child_ptr = tree.child_ptr.numpy()
    children = tree.children_flat.numpy()
    first = np.repeat(children[child_ptr[:-1]], np.diff(child_ptr))
    not_first = np.ones(children.size, dtype=bool)
    not_first[child_ptr[:-1]] = False
    return torch.from_numpy(mass[children][not_first] - mass[first][not_first])


def _node_height(parents: np.ndarray, num_leaves: int) -> np.ndarray:
    """Height of every node (leaves 0, a parent one more than its tallest child)."""
    height = np.zeros(parents.size, dtype=np.int64)
    frontier = np.arange(num_leaves)
    while frontier.size:
        child = frontier[parents[frontier] >= 0]
        np.maximum.at(height, parents[child], height[child] + 1)
        frontier = np.unique(parents[child])
    return height


def retree_weights(
    old_tree: Tree,
    old_weight: torch.Tensor,
    old_bias: torch.Tensor | None,
    new_tree: Tree,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters for ``new_tree`` that start where the old head's marginal left off.

    The new head gets zero weights and the bias of :func:`bias_from_log_prob` for the old head's
    marginal ``log mean_b p_old(y | hidden_b)`` over the given hidden states (``hidden=None``: the
    distribution at ``h = 0``, i.e. the old bias alone). So the new head predicts the old head's
    average distribution for every input -- a calibrated prior, never worse than uniform -- and its
    weights learn the input dependence again from the gradient, which is non-zero at zero
    weights. Exact per-input transfer is impossible in general: the new tree's node logits are
    not linear functions of the old ones.

    Returns:
        ``(weight, bias)`` of shapes (V - 1, D) and (V - 1,), in ``old_weight``'s dtype/device.
    """
    from hsoftmax import reference

    if old_tree.num_leaves != new_tree.num_leaves:
        raise ValueError(
            f"new_tree has {new_tree.num_leaves} leaves but old_tree has {old_tree.num_leaves}"
        )
    dim = old_weight.shape[1]
    with torch.no_grad():
        if hidden is None:
            hidden = torch.zeros(1, dim)
        h = hidden.detach().to(torch.float64).cpu()
        if h.dim() != 2 or h.shape[1] != dim:
            raise ValueError(f"hidden must have shape (B, {dim}), got {tuple(hidden.shape)}")
        w = old_weight.detach().to(torch.float64).cpu()
        b = None if old_bias is None else old_bias.detach().to(torch.float64).cpu()
        marginal = torch.zeros(old_tree.num_leaves, dtype=torch.float64) - math.inf
        for start in range(0, max(1, h.shape[0]), 256):  # bounded memory: 256 x V at a time
            chunk = reference.log_prob_all(h[start : start + 256], w, b, old_tree)
            marginal = torch.logaddexp(marginal, torch.logsumexp(chunk, 0))
        bias = bias_from_log_prob(new_tree, marginal)
    weight = torch.zeros(new_tree.num_rows, dim, dtype=old_weight.dtype, device=old_weight.device)
    return weight, bias.to(dtype=old_weight.dtype, device=old_weight.device)


# ----------------------------------------------------------------------------- validation


def _as_counts(counts, name: str) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    w = np.asarray(counts)
    if w.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one count per leaf), got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{name} is empty: a tree needs at least one leaf")
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
