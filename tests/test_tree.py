"""Tree construction, validation, compilation and persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsoftmax import Tree

from conftest import random_tree


def brute_paths(parents: list[int], num_leaves: int) -> dict[int, list[tuple[int, int]]]:
    """Per leaf, the (internal node id, child position) pairs from the root down."""
    children: dict[int, list[int]] = {}
    for node, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, []).append(node)
    paths = {}
    for leaf in range(num_leaves):
        path, node = [], leaf
        while parents[node] >= 0:
            p = parents[node]
            path.append((p, sorted(children[p]).index(node)))
            node = p
        paths[leaf] = path[::-1]
    return paths


@pytest.mark.parametrize(
    "num_leaves,arity,depth",
    [(1, 2, 0), (2, 2, 1), (3, 2, 2), (7, 3, 2), (1000, 2, 10), (15584, 128, 2), (15584, 2, 14)],
)
def test_balanced_shape(num_leaves, arity, depth):
    tree = Tree.balanced(num_leaves, arity)
    assert tree.num_leaves == num_leaves
    assert tree.depth == depth
    assert tree.num_rows == num_leaves - 1
    parents = tree.parents
    counts = torch.bincount(parents[parents >= 0], minlength=tree.num_nodes)
    assert int(counts[:num_leaves].sum()) == 0
    internal = counts[num_leaves:]
    assert bool((internal >= 2).all()) and bool((internal <= arity).all())


@pytest.mark.parametrize("seed", range(5))
def test_compiled_paths_match_brute_force(seed):
    tree = random_tree(40, seed)
    parents = tree.parents.tolist()
    v = tree.num_leaves
    c = tree.compiled()
    expected = brute_paths(parents, v)
    rows_of = {}
    for i in range(tree.num_nodes - v):
        rows_of[v + i] = (int(c.node_row_ptr[i]), int(c.node_row_ptr[i + 1]))
    max_rows = 0
    for leaf in range(v):
        lo, hi = int(c.leaf_path_ptr[leaf]), int(c.leaf_path_ptr[leaf + 1])
        got = [
            (int(n) + v, int(k))
            for n, k in zip(c.path_node[lo:hi], c.path_choice[lo:hi], strict=True)
        ]
        assert got == expected[leaf]
        max_rows = max(max_rows, sum(rows_of[n][1] - rows_of[n][0] for n, _ in got))
    assert tree.max_path_rows == max_rows
    # rows: internal nodes in id order, each owning (children - 1) consecutive rows
    sizes = [len(tree.children(n)) - 1 for n in range(v, tree.num_nodes)]
    assert np.diff(c.node_row_ptr.numpy()).tolist() == sizes
    assert int(c.node_row_ptr[-1]) == v - 1


def test_parents_round_trip_and_equality():
    tree = random_tree(50, 3)
    again = Tree.from_parents(tree.parents)
    assert again == tree
    assert again.parents.dtype == torch.int64
    assert Tree.from_parents(tree.parents.tolist(), num_leaves=50) == tree


@pytest.mark.parametrize(
    "parents,num_leaves,message",
    [
        ([], None, "empty"),
        ([3, 3, 4, 9, -1], None, "out of range"),
        ([2, 2, -1, -1], 2, "two or more roots"),
        ([2, 2, 3, 2], 2, "no root|cycle"),
        ([2, 0, -1], 2, "leaf 0 has children"),
        ([2, 3, 3, -1], 2, "internal node 2 has 1 children"),
        ([2, 2, 6, -1, 5, 4, -1], 2, "two or more roots"),
        ([3, 3, 4, 4, 2], 3, "no root|cycle"),
        ([4, 4, 5, 5, -1, 6, 5], 4, "cycle|children"),
        ([2, 2, -1, 2], None, "no children but its id"),
        ([1, 1, -1], None, "its own parent"),
        ([0.5, -1], None, "integers"),
        ([[0, -1]], None, "1-D"),
        ([7, -1], None, "out of range"),
    ],
)
def test_malformed_parents_raise(parents, num_leaves, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_parents(parents, num_leaves=num_leaves)


def test_unreachable_node_in_cycle_is_named():
    # 0,1 -> 4 (root); 2,3 -> 5 and 5 -> 6 -> 5 is a cycle below nothing
    parents = [4, 4, 5, 5, -1, 6, 5]
    with pytest.raises(ValueError, match="cycle|children"):
        Tree.from_parents(parents, num_leaves=4)
    # a well-formed internal structure, but a detached cycle of internal nodes with 2 children
    parents = [6, 6, 7, 7, 8, 8, -1, 8, 7]
    with pytest.raises(ValueError, match="cycle"):
        Tree.from_parents(parents, num_leaves=6)


def test_bad_balanced_arguments():
    with pytest.raises(ValueError, match="arity"):
        Tree.balanced(10, 1)
    with pytest.raises(ValueError, match="num_leaves"):
        Tree.balanced(0)
    with pytest.raises(TypeError, match="num_leaves"):
        Tree.balanced(3.5)


def test_save_load_round_trip(tmp_path):
    tree = random_tree(200, 1)
    path = tmp_path / "t.tree"
    tree.save(path)
    loaded = Tree.load(path)
    assert loaded == tree
    for a, b in zip(tree.compiled(), loaded.compiled(), strict=True):
        assert torch.equal(a, b)


def test_load_rejects_truncated_and_edited_files(tmp_path):
    tree = Tree.balanced(300, 3)
    path = tmp_path / "t.tree"
    tree.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.tree"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.tree"):
        Tree.load(truncated)
    # flip bits inside the parents payload: the checksum must catch it
    import zipfile

    edited = tmp_path / "edited.tree"
    with zipfile.ZipFile(path) as z:
        header, payload = z.read("header.json"), bytearray(z.read("parents.i8"))
    payload[8] ^= 0x01
    with zipfile.ZipFile(edited, "w") as z:
        z.writestr("header.json", header)
        z.writestr("parents.i8", bytes(payload))
    with pytest.raises(ValueError, match="checksum"):
        Tree.load(edited)
    foreign = tmp_path / "foreign.tree"
    foreign.write_text("hello")
    with pytest.raises(ValueError, match="foreign.tree"):
        Tree.load(foreign)


def test_pickle_round_trip():
    import pickle

    tree = Tree.balanced(77, 4)
    assert pickle.loads(pickle.dumps(tree)) == tree


def test_million_leaves():
    tree = Tree.balanced(1_000_000, 2)
    assert tree.depth == 20
    c = tree.compiled()
    assert c.leaf_path_ptr.shape == (1_000_001,)
    assert int(c.leaf_path_ptr[-1]) == int(tree.leaf_depth.sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1), st.integers(2, 6))
def test_random_trees_are_valid(num_leaves, seed, max_children):
    tree = random_tree(num_leaves, seed, max_children)
    parents = tree.parents
    counts = torch.bincount(parents[parents >= 0], minlength=tree.num_nodes)
    assert bool((counts[:num_leaves] == 0).all())
    assert bool((counts[num_leaves:] >= 2).all())
    assert Tree.from_parents(parents) == tree
    assert tree.num_rows == num_leaves - 1


def test_table_attributes_are_copies_and_read_only():
    tree = Tree.from_parents([3, 3, 4, 4, -1])
    for name in ("parents", "leaf_depth", "child_ptr", "children_flat"):
        table = getattr(tree, name)
        table.fill_(99)  # a caller's copy: the tree keeps its own table
        assert not torch.equal(getattr(tree, name), table), name
        with pytest.raises(AttributeError, match=f"a Tree's {name} cannot be set"):
            setattr(tree, name, table)
    assert tree.parents.tolist() == [3, 3, 4, 4, -1]
