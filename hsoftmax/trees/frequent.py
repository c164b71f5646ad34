"""Lifting the most frequent classes to the root: an adaptive-softmax head inside any tree."""

from __future__ import annotations

import numpy as np

from hsoftmax.tree import Tree
from hsoftmax.trees._checks import _as_counts, _int_at_least


def lift_frequent(tree: Tree, counts, n: int) -> Tree:
    """``tree`` with its ``n`` most frequent leaves moved to be direct children of the root.

    A class deep in a tree is trained only by the examples whose targets share its ancestors;
    at the root it is trained by every example, as in a dense head (and as in the "head" of an
    adaptive softmax). The other leaves keep their places. An internal node left with one child
    is replaced by that child, one left with none is removed, and the internal nodes are
    renumbered in their old order after the V leaves. Ties in ``counts`` go to the lower id;
    ``n = 0`` returns the tree unchanged.

    Args:
        tree: any :class:`~hsoftmax.tree.Tree` over V leaves.
        counts: (V,) non-negative class frequencies (e.g. the training targets' counts).
        n: how many leaves to lift, in ``[0, V]``.
    """
    v = tree.num_leaves
    counts = _as_counts(counts, "counts")
    if counts.shape != (v,):
        raise ValueError(f"counts must have one entry per leaf ({v}), got shape {counts.shape}")
    n = _int_at_least(n, 0, "n")
    if n > v:
        raise ValueError(f"n must be at most the number of leaves ({v}), got {n}")
    if n == 0:
        return tree
    parents = np.asarray(tree.parents, dtype=np.int64).copy()
    root = int(np.flatnonzero(parents == -1)[0])
    top = np.argsort(-counts, kind="stable")[:n]
    parents[top] = root
    alive = np.ones(parents.size, dtype=bool)
    while True:  # splice out internal nodes left with fewer than two children
        kids = np.bincount(parents[alive & (parents >= 0)], minlength=parents.size)
        lonely = np.flatnonzero(alive & (np.arange(parents.size) >= v) & (kids < 2))
        lonely = lonely[lonely != root]
        if lonely.size == 0:
            break
        node = int(lonely[0])
        parents[(parents == node) & alive] = parents[node]
        alive[node] = False
    keep = np.flatnonzero(alive)
    new_id = np.full(parents.size, -1, dtype=np.int64)
    new_id[keep] = np.arange(keep.size)
    out = parents[keep]
    out[out >= 0] = new_id[out[out >= 0]]
    return Tree.from_parents(out, v)
