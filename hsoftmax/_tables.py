"""Tables derived from a :class:`~hsoftmax.Tree`, each built once and cached on the tree.

Every consumer of a tree's flattened form reads it from the tree (``tree.search_tables()``,
``tree.level_tables(device)``, ...), never flattens the tree itself: the kernels' CSR tensors
(:meth:`Tree.compiled`), the search kernels' child lists (:class:`SearchTables`), the all-leaves
and label-smoothing tables of the head (:class:`LevelTables`, :class:`SmoothBucket`,
:class:`NodePaths`, :class:`LeafPaths`) and the reference's padded paths (:class:`PaddedPaths`).

Dimension letters: V leaves, M internal nodes, N = V + M nodes, E = N - 1 edges, L max depth,
C max children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hsoftmax.tree import Tree


def _tensor(a, device, dtype=torch.int64) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


@dataclass(frozen=True)
class LevelTables:
    """Index tensors for the all-leaves computations (``log_prob_all``, label smoothing).

    Edges (one per non-root node) are numbered in level order: level d's edges (those out of the
    nodes at depth d) are the contiguous range ``level_bounds[d]``. ``parent_edge[e]`` is the
    position, within the previous level's range, of the edge into e's parent node.
    """

    edge_zcol: torch.Tensor  # (E,) int64: column of _node_logits' z of each level-order edge
    edge_zuse: torch.Tensor  # (E,) bool: False for a child 0 (its logit is the implicit 0)
    edge_lcol: torch.Tensor  # (E,) int64: column of _node_logits' lse of the edge's parent
    parent_edge: torch.Tensor  # (E,) int64 (0 on level 0, unused there)
    leaf_edge: torch.Tensor  # (V,) int64: the level-order edge into each leaf
    level_bounds: tuple[tuple[int, int], ...]
    smooth: tuple[SmoothBucket, ...]  # the internal nodes, bucketed for the smoothing term

    @staticmethod
    def build(tree: Tree, device: torch.device) -> LevelTables:
        v, n = tree.num_leaves, tree.num_nodes
        parents = tree.parents.numpy()
        child_ptr = tree.child_ptr.numpy()
        children = tree.children_flat.numpy()
        counts = np.diff(child_ptr)
        node_row_ptr = child_ptr - np.arange(child_ptr.size)  # node i owns c_i - 1 rows
        parent_of = np.repeat(np.arange(n - v), counts)  # per CSR edge (children_flat order)

        # breadth-first: the CSR edges out of each level's internal nodes
        order_parts, bounds = [], []
        frontier = np.flatnonzero(parents == -1)
        start = 0
        while True:
            internal = frontier[frontier >= v] - v
            if internal.size == 0:
                break
            sizes = counts[internal]
            firsts = np.repeat(child_ptr[internal] - np.cumsum(sizes) + sizes, sizes)
            edges = firsts + np.arange(sizes.sum())
            order_parts.append(edges)
            bounds.append((start, start + edges.size))
            start += edges.size
            frontier = children[edges]
        order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
        level_index = np.empty_like(order)
        level_index[order] = np.arange(order.size)  # CSR edge -> level-order edge
        edge_into = np.full(n, -1, dtype=np.int64)  # CSR edge into each node
        edge_into[children] = np.arange(children.size)

        leaves = np.zeros(n, dtype=np.int64)  # leaves below each node, bottom-up by level
        leaves[:v] = 1
        for s, e in reversed(bounds):
            edges = order[s:e]
            np.add.at(leaves, parent_of[edges] + v, leaves[children[edges]])
        parent_edge = np.zeros(order.size, dtype=np.int64)
        for d in range(1, len(bounds)):
            s, e = bounds[d]
            into_parent = level_index[edge_into[parent_of[order[s:e]] + v]]
            parent_edge[s:e] = into_parent - bounds[d - 1][0]

        def tensor(a, dtype=torch.int64):
            return _tensor(a, device, dtype)

        smooth = SmoothBucket.build_all(
            counts, node_row_ptr, leaves[children] / v, child_ptr, device
        )
        zcol0, lcol = SmoothBucket.columns(smooth, n - v)
        parent = parent_of[order]
        position = order - child_ptr[parent]  # child position among its siblings
        return LevelTables(
            smooth=smooth,
            edge_zcol=tensor(np.where(position >= 1, zcol0[parent] + position - 1, 0)),
            edge_zuse=tensor(position >= 1, torch.bool),
            edge_lcol=tensor(lcol[parent]),
            parent_edge=tensor(parent_edge),
            leaf_edge=tensor(level_index[edge_into[:v]] if n > 1 else np.zeros(v, np.int64)),
            level_bounds=tuple(bounds),
        )


@dataclass(frozen=True)
class SmoothBucket:
    """Internal nodes whose ``c - 1`` weight rows are padded to one ``width`` (1 for binary
    nodes, else the next power of two, so a tree has at most ~log2(max c) buckets and pads less
    than 2x), for :meth:`hsoftmax.nn.HierarchicalSoftmax._node_logits`."""

    width: int
    nodes: np.ndarray  # (nodes,) int64 internal-node indices (node id - V), on the CPU
    rows: torch.Tensor | None  # (nodes * width,) int64 weight rows (pads: row 0); None: a slice
    start: int  # ... the contiguous rows start:stop when rows is None
    stop: int
    pad: torch.Tensor | None  # (nodes, width) bool, True at pads; None: no padding
    share: torch.Tensor  # (nodes * width,) float64: leaves under the row's child / V (pads: 0)
    node_share: torch.Tensor  # (nodes,) float64: leaves under the node / V

    @staticmethod
    def build_all(counts, node_row_ptr, child_share, child_ptr, device) -> tuple:
        """``counts`` (M,) children per internal node, ``node_row_ptr`` (M + 1,) its first weight
        row, ``child_share`` (E,) leaves under each CSR edge's child / V."""
        rows_per_node = counts - 1  # every internal node has >= 2 children, so >= 1 row
        widths = 2 ** np.ceil(np.log2(rows_per_node)).astype(np.int64)
        buckets = []
        for width in np.unique(widths):
            nodes = np.flatnonzero(widths == width)
            need = rows_per_node[nodes]
            col = np.arange(width)
            valid = col[None, :] < need[:, None]  # (nodes, width)
            rows = np.where(valid, node_row_ptr[nodes][:, None] + col, 0)
            # row j of a node scores its child j + 1 (child 0 holds the implicit logit 0)
            edge = np.where(valid, child_ptr[nodes][:, None] + 1 + col, 0)
            share = np.where(valid, child_share[edge], 0.0)
            node_share = np.add.reduceat(child_share, child_ptr[:-1])[nodes]
            flat_rows = rows.ravel()
            contiguous = bool(valid.all()) and np.array_equal(
                flat_rows, np.arange(flat_rows[0], flat_rows[0] + flat_rows.size)
            )

            def tensor(a, dtype=torch.int64):
                return _tensor(a, device, dtype)

            buckets.append(
                SmoothBucket(
                    width=int(width),
                    nodes=nodes,
                    rows=None if contiguous else tensor(flat_rows),
                    start=int(flat_rows[0]) if contiguous else 0,
                    stop=int(flat_rows[0] + flat_rows.size) if contiguous else 0,
                    pad=None if bool(valid.all()) else tensor(~valid, torch.bool),
                    share=tensor(share.ravel(), torch.float64),
                    node_share=tensor(node_share, torch.float64),
                )
            )
        return tuple(buckets)

    @staticmethod
    def columns(buckets: tuple[SmoothBucket, ...], internal: int) -> tuple[np.ndarray, np.ndarray]:
        """Per internal node: the column of its first logit in the concatenated z, and of its
        log-sum-exp in the concatenated lse (the head's ``_node_logits``)."""
        zcol0 = np.zeros(internal, dtype=np.int64)
        lcol = np.zeros(internal, dtype=np.int64)
        zoff = loff = 0
        for b in buckets:
            zcol0[b.nodes] = zoff + np.arange(b.nodes.size) * b.width
            lcol[b.nodes] = loff + np.arange(b.nodes.size)
            zoff += b.nodes.size * b.width
            loff += b.nodes.size
        return zcol0, lcol

    def to(self, device: torch.device) -> SmoothBucket:
        def move(t):
            return None if t is None else t.to(device)

        return SmoothBucket(
            width=self.width,
            nodes=self.nodes,
            rows=move(self.rows),
            start=self.start,
            stop=self.stop,
            pad=move(self.pad),
            share=self.share.to(device),
            node_share=self.node_share.to(device),
        )


def _path_entries(tree: Tree):
    """The tree's path entries (root first) as int64 arrays: ``(node, choice, leaf, position
    on the leaf's path, max depth >= 1)``."""
    compiled = tree.compiled("cpu")
    ptr = compiled.leaf_path_ptr.numpy()
    node = compiled.path_node.numpy().astype(np.int64)
    choice = compiled.path_choice.numpy().astype(np.int64)
    lengths = np.diff(ptr)
    depth = max(int(lengths.max()) if tree.num_leaves else 0, 1)
    leaf = np.repeat(np.arange(tree.num_leaves), lengths)
    return node, choice, leaf, np.arange(node.size) - ptr[leaf], depth


@dataclass(frozen=True)
class NodePaths:
    """Each leaf's path as its internal nodes and its taken rows, padded to the tree's depth L:
    the tables of node-level smoothing (pads have coefficient 0)."""

    node: torch.Tensor  # (V, L) int64: internal node index on the path (0 at pads)
    node_coef: torch.Tensor  # (V, L) float: -1 / children of that node (0 at pads)
    taken: torch.Tensor  # (V, L) int64: weight row of the child taken (0 for child 0 and pads)
    taken_coef: torch.Tensor  # (V, L) float: 1 where a child >= 1 was taken, else 0
    node_of_row: torch.Tensor  # (V - 1,) int64: the internal node owning each weight row
    num_nodes: int  # internal nodes

    @staticmethod
    def build(tree: Tree, device, dtype) -> NodePaths:
        node, choice, leaf, at, depth = _path_entries(tree)
        row_ptr = tree.compiled("cpu").node_row_ptr.numpy().astype(np.int64)
        v, m = tree.num_leaves, row_ptr.size - 1
        tables = {
            "node": np.zeros((v, depth), dtype=np.int64),
            "node_coef": np.zeros((v, depth), dtype=np.float64),
            "taken": np.zeros((v, depth), dtype=np.int64),
            "taken_coef": np.zeros((v, depth), dtype=np.float64),
        }
        tables["node"][leaf, at] = node
        tables["node_coef"][leaf, at] = -1.0 / (row_ptr[node + 1] - row_ptr[node] + 1)
        picked = choice >= 1
        tables["taken"][leaf[picked], at[picked]] = row_ptr[node[picked]] + choice[picked] - 1
        tables["taken_coef"][leaf[picked], at[picked]] = 1.0
        tables["node_of_row"] = np.repeat(np.arange(m), np.diff(row_ptr))
        out = {k: torch.as_tensor(a, device=device) for k, a in tables.items()}
        for k in ("node_coef", "taken_coef"):
            out[k] = out[k].to(dtype)
        return NodePaths(**out, num_nodes=m)


@dataclass(frozen=True)
class LeafPaths:
    """Each leaf's path as columns of the head's ``_node_logits`` outputs, padded to the
    tree's depth L: ``log p(l) = sum_j [zuse] z[zcol] - [luse] lse[lcol]``."""

    zcol: torch.Tensor  # (V, L) int32: column of z of the child taken (0 where unused)
    zuse: torch.Tensor  # (V, L) bool: a child >= 1 was taken (child 0's logit is 0)
    lcol: torch.Tensor  # (V, L) int32: column of lse of the path's node (0 at pads)
    luse: torch.Tensor  # (V, L) bool: a node of the path (False at pads)

    @staticmethod
    def build(tree: Tree, buckets: tuple[SmoothBucket, ...], device) -> LeafPaths:
        zcol0, lcol = SmoothBucket.columns(buckets, tree.num_nodes - tree.num_leaves)
        node, choice, leaf, pos, width = _path_entries(tree)
        v = tree.num_leaves
        tables = {name: np.zeros((v, width), dtype=np.int32) for name in ("zcol", "lcol")}
        masks = {name: np.zeros((v, width), dtype=bool) for name in ("zuse", "luse")}
        tables["lcol"][leaf, pos] = lcol[node]
        masks["luse"][leaf, pos] = True
        taken = choice >= 1
        tables["zcol"][leaf[taken], pos[taken]] = zcol0[node[taken]] + choice[taken] - 1
        masks["zuse"][leaf[taken], pos[taken]] = True
        return LeafPaths(
            **{name: torch.as_tensor(a, device=device) for name, a in {**tables, **masks}.items()}
        )


@torch.compiler.disable
def move_level_tables(flat: LevelTables, device: torch.device) -> LevelTables:
    names = ("edge_zcol", "edge_zuse", "edge_lcol", "parent_edge", "leaf_edge")
    moved = {name: getattr(flat, name).to(device) for name in names}
    smooth = tuple(b.to(device) for b in flat.smooth)
    return LevelTables(level_bounds=flat.level_bounds, smooth=smooth, **moved)


@dataclass(frozen=True)
class SearchTables:
    """The flat tensors the search kernels take (CPU): ``topk_leaves``, ``leaf_rank``,
    ``leaf_log_prob_all``."""

    child_ptr: torch.Tensor  # (M + 1,) int64: children of internal node i are [ptr[i], ptr[i+1])
    children: torch.Tensor  # (N - 1,) int32: node ids, grouped by parent, ordered by id
    node_row_ptr: torch.Tensor  # (M + 1,) int32: weight row of child k >= 1 is ptr[i] + k - 1
    leaf_path_ptr: torch.Tensor  # (V + 1,) int64
    path_node: torch.Tensor  # (P,) int32 internal-node index, root first
    path_choice: torch.Tensor  # (P,) int32 position of the child taken
    root: int  # node id of the root (the leaf 0 when V = 1)

    @staticmethod
    def build(tree: Tree) -> SearchTables:
        compiled = tree.compiled("cpu")
        parents = tree.parents.numpy()
        return SearchTables(
            child_ptr=tree.child_ptr.contiguous(),
            children=tree.children_flat.to(torch.int32).contiguous(),
            node_row_ptr=compiled.node_row_ptr,
            leaf_path_ptr=compiled.leaf_path_ptr,
            path_node=compiled.path_node,
            path_choice=compiled.path_choice,
            root=int(np.flatnonzero(parents == -1)[0]),
        )


@dataclass(frozen=True)
class PaddedPaths:
    """Each leaf's path as padded (V, L, C - 1) weight rows: the gather-and-matmul layout of
    :func:`hsoftmax.reference.path_log_prob` (the usual way to write HS in PyTorch)."""

    rows: torch.Tensor  # (V, L, C - 1) int64 weight row, -1 where a node has fewer children
    choice: torch.Tensor  # (V, L) int64 position of the child taken
    valid: torch.Tensor  # (V, L) float 1 on the path, 0 at pads

    @staticmethod
    def build(tree: Tree, device: torch.device) -> PaddedPaths:
        c = tree.compiled("cpu")
        v = tree.num_leaves
        depth = (c.leaf_path_ptr[1:] - c.leaf_path_ptr[:-1]).long()
        max_depth = int(depth.max()) if v else 0
        node_rows = (c.node_row_ptr[1:] - c.node_row_ptr[:-1]).long()
        width = int(node_rows.max()) if node_rows.numel() else 0
        rows = torch.full((v, max_depth, width), -1, dtype=torch.long)
        choice = torch.zeros((v, max_depth), dtype=torch.long)
        valid = torch.zeros((v, max_depth))
        leaf = torch.repeat_interleave(torch.arange(v), depth)
        step = torch.arange(leaf.numel()) - c.leaf_path_ptr[leaf]
        node = c.path_node.long()
        for k in range(width):
            has = node_rows[node] > k
            rows[leaf[has], step[has], k] = c.node_row_ptr[node[has]].long() + k
        choice[leaf, step] = c.path_choice.long()
        valid[leaf, step] = 1.0
        return PaddedPaths(rows.to(device), choice.to(device), valid.to(device))
