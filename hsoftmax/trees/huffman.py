"""Frequency-based k-ary Huffman trees (word2vec/fastText style)."""

from __future__ import annotations

from collections import deque

import numpy as np

from hsoftmax.tree import Tree
from hsoftmax.trees._checks import _as_counts, _int_at_least


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
