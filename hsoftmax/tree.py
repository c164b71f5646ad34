"""The tree of a hierarchical softmax, held as flat integer arrays.

Glossary (used across the package):
    V  number of leaves (classes), ids ``0 .. V-1``
    N  number of nodes; internal nodes have ids ``V .. N-1``
    M  number of internal nodes, ``N - V``
    P  total path length, the sum over leaves of the number of internal nodes above each leaf
    R  the largest number of weight rows an example's path touches (``max_path_rows``)

Parameter layout: internal node ``n`` with ``c`` children (ordered by node id) is a softmax over
them. Its first child has logit 0; child ``k >= 1`` owns weight row ``node_row_ptr[i] + k - 1``
where ``i = n - V``. Every tree over V leaves therefore has exactly ``V - 1`` rows.

The kernels only see the compiled tensors (``node_row_ptr``, ``leaf_path_ptr``, ``path_node``,
``path_choice``); they never see this Python object.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hsoftmax import _tables

__all__ = ["Tree"]

_FORMAT = "hsoftmax-tree"
_FORMAT_VERSION = 1


class _Compiled(NamedTuple):
    """The flat tensors the kernels take (int32 values, int64 offsets), on one device."""

    node_row_ptr: torch.Tensor  # (M + 1,) int32: rows of internal node i are [ptr[i], ptr[i+1])
    leaf_path_ptr: torch.Tensor  # (V + 1,) int64: leaf y's path is [ptr[y], ptr[y+1])
    path_node: torch.Tensor  # (P,) int32: internal-node index i (node id - V), root first
    path_choice: torch.Tensor  # (P,) int32: position of the child taken among its siblings


def one_dim_array(values, name: str, item: str, what: str = "") -> np.ndarray:
    """``values`` (a tensor, array or sequence) as a non-empty 1-D NumPy array, one entry per
    ``item`` of a tree; a ValueError names ``name`` otherwise (``what`` says what an entry is)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D{what}, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a tree needs at least one {item}")
    return arr


class _TensorCopy:
    """A read-only attribute that returns a fresh int64 tensor copy of a private array, so a
    caller can never change the tree's own tables."""

    def __init__(self, attr: str, doc: str):
        self.attr, self.__doc__ = attr, doc

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, tree, owner=None):
        if tree is None:
            return self
        return torch.from_numpy(getattr(tree, self.attr).copy())

    def __set__(self, tree, value):
        raise AttributeError(f"a Tree's {self.name} cannot be set: trees are immutable")


class Tree:
    """A rooted tree whose leaves ``0 .. V-1`` are the classes of a hierarchical softmax.

    Build one with :meth:`from_parents`, :meth:`balanced` or the data-driven builders of
    :mod:`hsoftmax.trees` (``huffman``, ``from_features``, ``from_cooccurrence``); it is immutable.
    ``tree.parents`` round-trips any tree through :meth:`from_parents`.
    """

    def __init__(self, parents: np.ndarray, num_leaves: int, _validated: bool = False):
        if not _validated:
            raise TypeError("use Tree.from_parents(...) or Tree.balanced(...) to build a Tree")
        self._parents = parents
        self._num_leaves = int(num_leaves)
        self._device_cache: dict[torch.device, _Compiled] = {}
        self._tables: dict = {}  # derived tables (hsoftmax._tables), built on first use
        self._compile()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parents(
        cls, parents: Sequence[int] | np.ndarray | torch.Tensor, num_leaves: int | None = None
    ) -> Tree:
        """Build a tree from the parent of every node.

        Args:
            parents: length-N integer sequence; ``parents[n]`` is the parent of node ``n`` and the
                root's parent is -1. Nodes ``0 .. V-1`` are the leaves, nodes ``V .. N-1`` internal.
                Children of a node are ordered by node id.
            num_leaves: V. If omitted, V is the number of childless nodes (which must then be
                exactly ``0 .. V-1``).

        Raises:
            ValueError: naming the problem for an empty array, a parent id out of range, two or
                more roots, a leaf with children, an internal node with fewer than 2 children,
                a cycle or a node unreachable from the root.
        """
        arr = one_dim_array(parents, "parents", "node")
        if not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise ValueError(f"parents must hold integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=True)
        n = arr.size
        bad = np.flatnonzero((arr < -1) | (arr >= n))
        if bad.size:
            raise ValueError(
                f"parents[{bad[0]}] = {arr[bad[0]]} is out of range: must be -1 (root) or a node "
                f"id in [0, {n})"
            )
        roots = np.flatnonzero(arr == -1)
        if roots.size == 0:
            raise ValueError("no root: exactly one node must have parent -1 (the tree has a cycle)")
        if roots.size > 1:
            raise ValueError(
                f"two or more roots: nodes {roots[:5].tolist()} all have parent -1; a tree has one"
            )
        self_loop = np.flatnonzero(arr == np.arange(n))
        if self_loop.size:
            raise ValueError(f"cycle: node {self_loop[0]} is its own parent")
        num_children = np.bincount(arr[arr >= 0], minlength=n)
        if num_leaves is None:
            childless = np.flatnonzero(num_children == 0)
            num_leaves = childless.size
            if childless[-1] != num_leaves - 1:
                raise ValueError(
                    f"node {childless[-1]} has no children but its id is >= the number of leaves "
                    f"({num_leaves}); leaves must be the nodes 0 .. V-1"
                )
        num_leaves = int(num_leaves)
        if not 1 <= num_leaves <= n:
            raise ValueError(f"num_leaves must be in [1, {n}], got {num_leaves}")
        leaf_with_children = np.flatnonzero(num_children[:num_leaves] > 0)
        if leaf_with_children.size:
            y = leaf_with_children[0]
            raise ValueError(f"leaf {y} has children (nodes 0 .. {num_leaves - 1} are leaves)")
        if n == 1:
            return cls(arr, 1, _validated=True)
        if roots[0] < num_leaves:
            raise ValueError(f"leaf {roots[0]} is the root but the tree has {n} nodes")
        thin = np.flatnonzero(num_children[num_leaves:] < 2)
        if thin.size:
            node = num_leaves + thin[0]
            raise ValueError(
                f"internal node {node} has {num_children[node]} children; every internal node "
                "needs at least 2"
            )
        _check_reaches_root(arr, int(roots[0]))
        return cls(arr, num_leaves, _validated=True)

    @classmethod
    def balanced(cls, num_leaves: int, arity: int = 2) -> Tree:
        """A complete tree of the given arity: depth ``ceil(log_arity(V))``.

        Each level groups consecutive nodes into ``ceil(n / arity)`` groups as even as possible;
        a group of one is passed up unchanged, so every internal node has >= 2 children.
        """
        num_leaves = _positive_int(num_leaves, "num_leaves")
        arity = _positive_int(arity, "arity")
        if arity < 2:
            raise ValueError(f"arity must be >= 2, got {arity}")
        parents: list[np.ndarray] = [np.full(num_leaves, -1, dtype=np.int64)]
        level = np.arange(num_leaves, dtype=np.int64)
        next_id = num_leaves
        while level.size > 1:
            groups = -(-level.size // arity)
            sizes = np.full(groups, level.size // groups, dtype=np.int64)
            sizes[: level.size % groups] += 1
            new_level = np.empty(groups, dtype=np.int64)
            fresh = sizes > 1
            ids = next_id + np.arange(int(fresh.sum()), dtype=np.int64)
            next_id += ids.size
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            new_level[fresh] = ids
            new_level[~fresh] = level[starts[~fresh]]
            parents.append(np.full(ids.size, -1, dtype=np.int64))
            group_of = np.repeat(np.arange(groups), sizes)
            owner = new_level[group_of]
            moved = fresh[group_of]
            flat = np.concatenate(parents)
            flat[level[moved]] = owner[moved]
            parents = [flat]
            level = new_level
        return cls(parents[0], num_leaves, _validated=True)

    # ------------------------------------------------------------------ properties

    @property
    def num_leaves(self) -> int:
        """V, the number of classes."""
        return self._num_leaves

    @property
    def num_nodes(self) -> int:
        """N, leaves plus internal nodes."""
        return int(self._parents.size)

    @property
    def num_rows(self) -> int:
        """Rows of ``weight`` / ``bias`` the tree needs: always ``V - 1``."""
        return self._num_leaves - 1

    @property
    def depth(self) -> int:
        """Longest root-to-leaf path, in edges (0 for a single leaf)."""
        return int(self._leaf_depth.max())

    @property
    def max_path_rows(self) -> int:
        """R: the most weight rows one leaf's path touches (sum of ``c - 1`` along the path)."""
        return self._max_path_rows

    parents = _TensorCopy(
        "_parents", "(N,) int64 parent of every node, -1 for the root: the ``from_parents`` form."
    )

    leaf_depth = _TensorCopy(
        "_leaf_depth", "(V,) int64 number of internal nodes (edges) on each leaf's path."
    )

    def children(self, node: int) -> list[int]:
        """Children of ``node`` in order (the first has logit 0)."""
        i = node - self._num_leaves
        if i < 0:
            return []
        return self._children[self._child_ptr[i] : self._child_ptr[i + 1]].tolist()

    child_ptr = _TensorCopy(
        "_child_ptr", "(M + 1,) int64 CSR offsets into :attr:`children_flat` per internal node."
    )

    children_flat = _TensorCopy(
        "_children",
        "(N - 1,) int64 children of the internal nodes, grouped by node, ordered by id.",
    )

    def compiled(self, device: torch.device | str = "cpu") -> _Compiled:
        """The kernel tensors on ``device``, moved once and cached."""
        device = _canonical(device)
        cached = self._device_cache.get(device)
        if cached is None:
            cpu = self._device_cache[torch.device("cpu")]
            cached = _Compiled(*(t.to(device) for t in cpu))
            self._device_cache[device] = cached
        return cached

    # Derived tables: built on first use from the compiled form, cached on this (immutable) tree
    # and shared by every consumer (heads, searches, references).

    def search_tables(self) -> _tables.SearchTables:
        """The child lists and paths the CPU search kernels take (``hsoftmax.ops.topk_leaves``)."""
        return self._cached("search", lambda: _tables.SearchTables.build(self))

    def level_tables(self, device: torch.device | str = "cpu") -> _tables.LevelTables:
        """Level-order edge tables and smoothing buckets: the head's all-leaves computations."""
        device = _canonical(device)
        if device.type == "cpu":
            return self._cached(("level", device), lambda: _tables.LevelTables.build(self, device))
        cpu = self.level_tables("cpu")
        return self._cached(("level", device), lambda: _tables.move_level_tables(cpu, device))

    def node_paths(self, device: torch.device | str, dtype: torch.dtype) -> _tables.NodePaths:
        """(V, L) path nodes and taken rows with coefficients: node-level label smoothing."""
        device = _canonical(device)
        key = ("node_paths", device, dtype)
        return self._cached(key, lambda: _tables.NodePaths.build(self, device, dtype))

    def leaf_paths(self, device: torch.device | str) -> _tables.LeafPaths:
        """(V, L) columns of the head's node logits along each leaf's path."""
        device = _canonical(device)
        buckets = self.level_tables("cpu").smooth
        return self._cached(
            ("leaf_paths", device), lambda: _tables.LeafPaths.build(self, buckets, device)
        )

    def padded_paths(self, device: torch.device | str = "cpu") -> _tables.PaddedPaths:
        """(V, L, C - 1) padded path rows: the layout of the plain-PyTorch reference."""
        device = _canonical(device)
        return self._cached(("padded", device), lambda: _tables.PaddedPaths.build(self, device))

    def _cached(self, key, build):
        value = self._tables.get(key)
        if value is None:
            value = self._tables[key] = build()
        return value

    def __repr__(self) -> str:
        return (
            f"Tree(num_leaves={self.num_leaves}, num_nodes={self.num_nodes}, "
            f"depth={self.depth}, max_path_rows={self.max_path_rows})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Tree)
            and self._num_leaves == other._num_leaves
            and np.array_equal(self._parents, other._parents)
        )

    __hash__ = None  # mutable-looking arrays inside; compare with ==

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict:
        """A plain dict (tensors and ints) that :meth:`from_state` restores; for ``state_dict``."""
        return {"parents": self.parents, "num_leaves": self.num_leaves}

    @classmethod
    def from_state(cls, state: dict) -> Tree:
        return cls.from_parents(state["parents"], num_leaves=int(state["num_leaves"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tree to ``path`` (a zip with a versioned header and a SHA-256 checksum).

        The write is atomic: a temporary file in the same directory is renamed over ``path``.
        """
        path = Path(path)
        payload = self._parents.astype("<i8").tobytes()
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "num_leaves": self.num_leaves,
            "num_nodes": self.num_nodes,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("header.json", json.dumps(header, indent=1))
                z.writestr("parents.i8", payload)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tree:
        """Read a tree written by :meth:`save`; a truncated, edited or foreign file raises
        ``ValueError`` naming the file and the problem."""
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as z:
                header = json.loads(z.read("header.json"))
                payload = z.read("parents.i8")
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, EOFError) as e:
            raise ValueError(f"{path}: not a readable hsoftmax tree file ({e})") from e
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an hsoftmax tree file (format={header.get('format')!r})")
        if header.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: tree format version {header.get('version')} is not supported "
                f"(this hsoftmax reads version {_FORMAT_VERSION})"
            )
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError(f"{path}: checksum mismatch, the file is corrupted or was edited")
        parents = np.frombuffer(payload, dtype="<i8").astype(np.int64)
        if parents.size != header.get("num_nodes"):
            raise ValueError(
                f"{path}: header says {header.get('num_nodes')} nodes, found {parents.size}"
            )
        try:
            return cls.from_parents(parents, num_leaves=header["num_leaves"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def __getstate__(self):  # pickling (e.g. DataLoader workers, torch.save of a module)
        return self.to_state()

    def __setstate__(self, state):
        other = Tree.from_state(state)
        self.__dict__.update(other.__dict__)

    # ------------------------------------------------------------------ compilation

    def _compile(self) -> None:
        v, n = self._num_leaves, self._parents.size
        m = n - v
        parents = self._parents
        # children of each internal node, ordered by id: a stable sort of node ids by parent.
        nonroot = np.flatnonzero(parents >= 0)
        order = nonroot[np.argsort(parents[nonroot], kind="stable")]
        counts = np.bincount(parents[nonroot] - v, minlength=m) if m else np.zeros(0, np.int64)
        child_ptr = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=child_ptr[1:])
        position = np.zeros(n, dtype=np.int64)  # index of each node among its siblings
        position[order] = np.arange(order.size) - child_ptr[parents[order] - v]
        node_row_ptr = child_ptr - np.arange(m + 1)  # node i owns c_i - 1 rows

        # Depth of every node by pointer jumping (log2(depth) passes, so deep Huffman trees stay
        # fast); P = the sum of the leaves' depths is the size of the path arrays.
        depth = _node_depths(parents)[:v]
        leaf_path_ptr = np.zeros(v + 1, dtype=np.int64)
        np.cumsum(depth, out=leaf_path_ptr[1:])
        total = int(leaf_path_ptr[-1])
        path_node = np.empty(total, dtype=np.int32)
        path_choice = np.empty(total, dtype=np.int32)
        path_rows = np.zeros(v, dtype=np.int64)
        cur = np.arange(v)
        remaining = depth.copy()
        idx = np.flatnonzero(remaining > 0)
        while idx.size:
            node = cur[idx]
            parent = parents[node]
            slot = leaf_path_ptr[idx] + remaining[idx] - 1  # fill each path from its end
            path_node[slot] = parent - v
            path_choice[slot] = position[node]
            path_rows[idx] += counts[parent - v] - 1
            cur[idx] = parent
            remaining[idx] -= 1
            idx = idx[remaining[idx] > 0]

        self._child_ptr = child_ptr
        self._children = order.astype(np.int64)
        self._leaf_depth = depth
        self._max_path_rows = int(path_rows.max()) if v else 0
        self._device_cache[torch.device("cpu")] = _Compiled(
            node_row_ptr=torch.from_numpy(node_row_ptr.astype(np.int32)),
            leaf_path_ptr=torch.from_numpy(leaf_path_ptr),
            path_node=torch.from_numpy(path_node),
            path_choice=torch.from_numpy(path_choice),
        )


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _node_depths(parents: np.ndarray) -> np.ndarray:
    """Edges from each node to the root of a validated tree, in O(N log depth)."""
    root = int(np.flatnonzero(parents < 0)[0])
    up = parents.copy()
    up[root] = root
    dist = (parents >= 0).astype(np.int64)  # distance to `up`
    while True:
        done = up == root
        if done.all():
            return dist
        dist = dist + np.where(done, 0, dist[up])
        up = up[up]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_reaches_root(parents: np.ndarray, root: int) -> None:
    """Raise if some node's chain of parents never reaches ``root`` (a cycle, or below one)."""
    n = parents.size
    jump = parents.copy()
    jump[root] = root
    # pointer doubling: after k rounds each node points 2^k steps up (or at the root).
    for _ in range(max(1, int(np.ceil(np.log2(n))) + 1)):
        jump = jump[jump]
    stuck = np.flatnonzero(jump != root)
    if stuck.size:
        raise ValueError(
            f"cycle: node {stuck[0]} never reaches the root {root} through its parents "
            f"({stuck.size} node(s) are on or below a cycle)"
        )
