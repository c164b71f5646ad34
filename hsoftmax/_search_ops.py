"""Typed entry points and fake kernels of the exact tree searches (``topk_leaves``, ``leaf_rank``).

Dimension letters: B batch, D hidden size, V leaves, M internal nodes, N = V + M nodes.

The C++ library defines the schemas and the CPU kernels (``csrc/cpu/search_cpu.cpp``); there is no
CUDA kernel, so :class:`hsoftmax.nn.HierarchicalSoftmax` falls back to an exact dense method on
other devices. The searches are not differentiable (they return ids, ranks and detached values).
Arguments are validated by the caller (the head) before these run; the kernels check again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hsoftmax import _build  # noqa: F401  (loads the library and checks its torch version)
from hsoftmax.tree import Tree

__all__ = ["SearchTree", "leaf_log_prob_all", "leaf_rank", "search_tree", "topk_leaves"]


@dataclass(frozen=True)
class SearchTree:
    """The flat tensors the search kernels take (CPU), built once per tree."""

    child_ptr: torch.Tensor  # (M + 1,) int64: children of internal node i are [ptr[i], ptr[i+1])
    children: torch.Tensor  # (N - 1,) int32: node ids, grouped by parent, ordered by id
    node_row_ptr: torch.Tensor  # (M + 1,) int32: weight row of child k >= 1 is ptr[i] + k - 1
    leaf_path_ptr: torch.Tensor  # (V + 1,) int64
    path_node: torch.Tensor  # (P,) int32 internal-node index, root first
    path_choice: torch.Tensor  # (P,) int32 position of the child taken
    root: int  # node id of the root (the leaf 0 when V = 1)


def search_tree(tree: Tree) -> SearchTree:
    """Flatten ``tree`` for the search kernels (CPU tensors)."""
    compiled = tree.compiled("cpu")
    parents = tree.parents.numpy()
    root = int(np.flatnonzero(parents == -1)[0])
    return SearchTree(
        child_ptr=tree.child_ptr.contiguous(),
        children=tree.children_flat.to(torch.int32).contiguous(),
        node_row_ptr=compiled.node_row_ptr,
        leaf_path_ptr=compiled.leaf_path_ptr,
        path_node=compiled.path_node,
        path_choice=compiled.path_choice,
        root=root,
    )


def _scoring_args(hidden, weight, bias) -> tuple:
    return (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
    )


def _child_lists(tree: SearchTree) -> tuple:
    return tree.child_ptr, tree.children, tree.node_row_ptr


def topk_leaves(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tree: SearchTree,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k leaves by ``log p(leaf | hidden)``, by best-first search (CPU).

    Args:
        hidden: (B, D); weight: (V - 1, D); bias: (V - 1,) or None, all one dtype, on the CPU.
        tree: :func:`search_tree` of the head's tree.
        k: 1 <= k <= V.

    Returns:
        values (B, k) in ``hidden``'s dtype (accumulated in float32, or float64 for float64
        inputs) and indices (B, k) int64, ordered by log-prob descending, then leaf id ascending.
        Deterministic: the result does not depend on the thread count.
    """
    return torch.ops.hsoftmax.topk_leaves(
        *_scoring_args(hidden, weight, bias), *_child_lists(tree), tree.root, k
    )


def leaf_rank(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tree: SearchTree,
    target: torch.Tensor,
) -> torch.Tensor:
    """(B,) int64 1-based rank of ``target`` among all V leaves, by pruned depth-first search.

    ``rank = 1 + #{l : lp(l) > lp(y)} + #{l : lp(l) == lp(y), l < y}``: the position of ``y`` in
    the order of :func:`topk_leaves` with ``k = V``.
    """
    return torch.ops.hsoftmax.leaf_rank(
        *_scoring_args(hidden, weight, bias),
        *_child_lists(tree),
        tree.leaf_path_ptr,
        tree.path_node,
        tree.path_choice,
        tree.root,
        target.to(torch.int64).contiguous(),
    )


def leaf_log_prob_all(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tree: SearchTree
) -> torch.Tensor:
    """(B, V) ``log p(leaf | hidden)`` of every leaf with the bits :func:`topk_leaves` and
    :func:`leaf_rank` order by (CPU, not differentiable)."""
    return torch.ops.hsoftmax.leaf_log_prob_all(
        *_scoring_args(hidden, weight, bias), *_child_lists(tree), tree.root
    )


@torch.library.register_fake("hsoftmax::leaf_log_prob_all")
def _leaf_log_prob_all_fake(hidden, weight, bias, child_ptr, children, node_row_ptr, root):
    return hidden.new_empty((hidden.shape[0], weight.shape[0] + 1))


@torch.library.register_fake("hsoftmax::topk_leaves")
def _topk_leaves_fake(hidden, weight, bias, child_ptr, children, node_row_ptr, root, k):
    batch = hidden.shape[0]
    return hidden.new_empty((batch, k)), hidden.new_empty((batch, k), dtype=torch.int64)


@torch.library.register_fake("hsoftmax::leaf_rank")
def _leaf_rank_fake(
    hidden,
    weight,
    bias,
    child_ptr,
    children,
    node_row_ptr,
    leaf_path_ptr,
    path_node,
    path_choice,
    root,
    target,
):
    return target.new_empty((hidden.shape[0],), dtype=torch.int64)
