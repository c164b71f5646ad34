"""Tree statistics: depth and branching histograms, path lengths, expected dot products."""

from __future__ import annotations

import numpy as np

from hsoftmax.tree import Tree
from hsoftmax.trees._checks import _as_counts


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
