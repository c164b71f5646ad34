"""Trees whose subtrees group leaves that follow each other (a spectral embedding of the
transition graph, then hierarchical k-means)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hsoftmax.tree import Tree
from hsoftmax.trees._checks import _as_adjacency, _int_at_least
from hsoftmax.trees.kmeans import from_features


def from_cooccurrence(
    transitions,
    branching: Sequence[int] | int | str = (150,),
    *,
    dim: int | None = None,
    seed: int = 0,
    **kmeans_options,
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
        branching, seed: as in :func:`from_features`.
        dim: embedding dimension; default ``min(V - 1, 64)``.
        kmeans_options: passed on to :func:`from_features` (``max_children``,
            ``max_fraction``, ``n_init``, ``progress``); not ``coords``: the embedding is not a
            set of coordinates.

    Returns:
        The tree (deterministic under ``seed``).
    """
    if "coords" in kmeans_options:
        raise TypeError("from_cooccurrence() takes no coords: it clusters a spectral embedding")
    adj = _as_adjacency(transitions)
    v = adj.shape[0]
    seed = _int_at_least(seed, 0, "seed")
    if v <= 2:
        return from_features(np.zeros((v, 1)), branching, seed, **kmeans_options)
    dim = min(v - 1, 64) if dim is None else _int_at_least(dim, 1, "dim")
    return from_features(spectral_embedding(adj, dim, seed), branching, seed, **kmeans_options)


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
