"""Data-driven tree builders (Huffman, k-means, co-occurrence), tree statistics and re-treeing."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsoftmax import Tree, trees
from hsoftmax.nn import HierarchicalSoftmax
from hsoftmax.ops import path_log_prob

from conftest import random_tree

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ invariants


def assert_valid(tree: Tree, num_leaves: int, tmp_path) -> None:
    """Every leaf exactly once, every internal node >= 2 children, save/load round trip, and
    the op's probabilities over all leaves sum to 1."""
    assert tree.num_leaves == num_leaves
    parents = tree.parents
    assert parents.numel() == tree.num_nodes
    if num_leaves > 1:
        assert bool((tree.leaf_depth > 0).all())
        # every leaf has exactly one parent and is one internal node's child exactly once
        children = tree.children_flat
        leaf_children = children[children < num_leaves]
        assert sorted(leaf_children.tolist()) == list(range(num_leaves))
        assert bool((torch.diff(tree.child_ptr) >= 2).all())
    path = tmp_path / "t.hst"
    tree.save(path)
    loaded = Tree.load(path)
    assert loaded == tree
    for a, b in zip(tree.compiled(), loaded.compiled(), strict=True):
        assert torch.equal(a, b)
    assert_sums_to_one(tree)


def assert_sums_to_one(tree: Tree, dim: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    v = tree.num_leaves
    weight = torch.randn(v - 1, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(v - 1, generator=g, dtype=torch.float64)
    hidden = torch.randn(1, dim, generator=g, dtype=torch.float64).expand(v, dim)
    log_prob = path_log_prob(hidden, weight, bias, tree, torch.arange(v))
    total = float(torch.logsumexp(log_prob, 0).exp())
    assert abs(total - 1.0) < 1e-9, f"probabilities over {v} leaves sum to {total}"


counts_strategy = st.lists(
    st.one_of(st.just(0), st.integers(0, 1000), st.floats(0, 1e6, allow_nan=False)),
    min_size=1,
    max_size=60,
)


@PROPERTY
@given(counts=counts_strategy, arity=st.integers(2, 6))
def test_huffman_is_a_valid_tree(counts, arity, tmp_path_factory):
    tree = trees.huffman(counts, arity=arity)
    assert_valid(tree, len(counts), tmp_path_factory.mktemp("h"))
    assert bool((torch.diff(tree.child_ptr) <= arity).all())


@PROPERTY
@given(
    v=st.integers(1, 60),
    f=st.integers(1, 4),
    branching=st.sampled_from([(4,), (3, 3), (2,), "binary", (), 7]),
    duplicates=st.booleans(),
    seed=st.integers(0, 3),
)
def test_from_features_is_a_valid_tree(v, f, branching, duplicates, seed, tmp_path_factory):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(v, f))
    if duplicates:  # k-means must cope with identical points
        x = np.round(x)
    tree = trees.from_features(x, branching=branching, seed=seed)
    assert_valid(tree, v, tmp_path_factory.mktemp("f"))
    if isinstance(branching, int):
        branching = (branching,)
    if branching not in ("binary", ()):
        # balance: no node holds more leaves than max_children (default 4x the mean cluster
        # size), except a node split into k parts that had k or fewer points to begin with
        cap = max(2, math.ceil(4 * max(1.0, v / math.prod(branching))))
        parents = tree.parents[:v]
        leaf_children = torch.bincount(parents[parents >= 0], minlength=tree.num_nodes)
        assert int(leaf_children.max()) <= max(cap, max(branching))


@PROPERTY
@given(v=st.integers(1, 40), density=st.floats(0, 0.3), seed=st.integers(0, 3))
def test_from_cooccurrence_is_a_valid_tree(v, density, seed, tmp_path_factory):
    t = sp.random(v, v, density=density, random_state=seed, format="csr") * 10
    tree = trees.from_cooccurrence(t, branching=(3,), seed=seed)
    assert_valid(tree, v, tmp_path_factory.mktemp("c"))


# ---------------------------------------------------------------------------------- Huffman


def entropy_bits(counts) -> float:
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def count_vectors():
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, 5001) ** 1.1
    with_zeros = rng.integers(0, 50, 300).astype(float)
    with_zeros[rng.random(300) < 0.3] = 0
    return {
        "zipf": zipf,
        "zipf-shuffled": rng.permutation(zipf),
        "with-zeros": with_zeros,
        "uniform": np.ones(1000),
        "geometric": 0.5 ** np.arange(40),
        "random": rng.random(777),
        "two": np.array([3.0, 1.0]),
    }


@pytest.mark.parametrize("name,counts", count_vectors().items())
def test_huffman_within_one_bit_of_entropy(name, counts):
    stats = trees.tree_stats(trees.huffman(counts), counts)
    h = entropy_bits(counts)
    assert h - 1e-9 <= stats["expected_path_length"] < h + 1, (name, stats, h)
    assert stats["entropy_bits"] == pytest.approx(h)


@pytest.mark.parametrize("arity", [2, 3, 4, 8])
@pytest.mark.parametrize("name,counts", count_vectors().items())
def test_huffman_never_worse_than_balanced(name, counts, arity):
    huff = trees.tree_stats(trees.huffman(counts, arity=arity), counts)
    bal = trees.tree_stats(Tree.balanced(len(counts), arity), counts)
    assert huff["expected_path_length"] <= bal["expected_path_length"] + 1e-9, name
    # the k-ary entropy bound: H / log2(k) <= expected length < H / log2(k) + 1
    bound = entropy_bits(counts) / math.log2(arity)
    assert bound - 1e-9 <= huff["expected_path_length"] < bound + 1


def brute_huffman_cost(counts, arity) -> float:
    """Optimal expected k-ary code length by the textbook heap with zero-count padding."""
    w = [float(c) for c in counts]
    pad = (arity - 1 - (len(w) - 1) % (arity - 1)) % (arity - 1)
    heap = sorted(w + [0.0] * pad)
    cost = 0.0
    while len(heap) > 1:
        merged = sum(heap[:arity])
        cost += merged
        heap = sorted(heap[arity:] + [merged])
    return cost / sum(w)


@PROPERTY
@given(
    counts=st.lists(st.integers(0, 100), min_size=2, max_size=40).filter(lambda c: sum(c) > 0),
    arity=st.integers(2, 5),
)
def test_huffman_matches_padded_textbook_cost(counts, arity):
    stats = trees.tree_stats(trees.huffman(counts, arity=arity), counts)
    assert stats["expected_path_length"] == pytest.approx(brute_huffman_cost(counts, arity))


def test_huffman_edge_cases():
    assert trees.huffman([7]).num_nodes == 1
    assert trees.huffman([0, 0]).parents.tolist() == [2, 2, -1]
    assert trees.huffman([1, 2], arity=5).parents.tolist() == [2, 2, -1]
    # all zero counts: still a complete (balanced-ish) tree
    assert trees.huffman(np.zeros(100)).num_leaves == 100
    # ties: (count, creation order), so equal counts pair leaves in id order
    assert trees.huffman([1, 1, 1, 1]).parents.tolist() == [4, 4, 5, 5, 6, 6, -1]


def test_huffman_frequent_leaves_are_shallow():
    counts = np.array([1000, 1, 1, 1, 1, 1, 1, 1])
    depth = trees.huffman(counts).leaf_depth
    assert int(depth[0]) == 1 and int(depth[1:].min()) >= 3


@pytest.mark.parametrize(
    "counts,message",
    [([], "empty"), ([1, -1], "counts\\[1\\]"), ([1, float("nan")], "finite"), ([[1, 2]], "1-D")],
)
def test_huffman_rejects_bad_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        trees.huffman(counts)


def test_huffman_rejects_bad_arity():
    with pytest.raises(ValueError, match="arity"):
        trees.huffman([1, 2, 3], arity=1)


def test_huffman_is_deterministic_and_fast_at_diy_size():
    counts = np.random.default_rng(1).zipf(1.3, 15_584)
    assert trees.huffman(counts) == trees.huffman(counts.copy())


# ---------------------------------------------------------------------------------- k-means


def clustered_points(num_clusters=8, per_cluster=30, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-50, 50, size=(num_clusters, 2))
    label = np.repeat(np.arange(num_clusters), per_cluster)
    points = centres[label] + rng.normal(scale=spread, size=(label.size, 2))
    perm = rng.permutation(label.size)  # cluster members are not consecutive leaf ids
    return points[perm], label[perm]


def purity(tree: Tree, label: np.ndarray) -> float:
    """Share of leaves whose parent's majority label is their own."""
    parent = tree.parents.numpy()[: label.size]
    good = sum(Counter(label[parent == p]).most_common(1)[0][1] for p in np.unique(parent))
    return good / label.size


def test_from_features_recovers_clear_clusters():
    x, label = clustered_points()
    tree = trees.from_features(x, branching=(8,), seed=0)
    assert purity(tree, label) == 1.0
    # and each ground-truth cluster sits under a single parent
    parent = tree.parents.numpy()[: label.size]
    for k in range(8):
        assert np.unique(parent[label == k]).size == 1


def test_from_features_binary_separates_clusters():
    x, label = clustered_points(num_clusters=4, per_cluster=16)
    tree = trees.from_features(x, branching="binary", seed=0)
    parents = tree.parents.numpy()
    # the subtree of each cluster: the lowest common ancestor of its leaves holds only that cluster
    below = {}
    for leaf in range(label.size):
        node = parents[leaf]
        while node >= 0:
            below.setdefault(node, set()).add(label[leaf])
            node = parents[node]
    pure_sizes = Counter()
    for labels in below.values():
        if len(labels) == 1:
            pure_sizes[next(iter(labels))] += 1
    assert set(pure_sizes) == {0, 1, 2, 3}
    assert bool((torch.diff(tree.child_ptr) == 2).all())


def test_from_features_latlon_projects_to_km():
    # two groups 1 degree of longitude apart near the pole are ~17 km apart, while two groups
    # 0.5 degree of latitude apart are ~56 km apart: projected, the latitude split is the big one
    rng = np.random.default_rng(0)
    lat = np.concatenate([np.full(40, 81.0), np.full(40, 81.5)]) + rng.normal(0, 1e-3, 80)
    lon = np.tile(np.repeat([10.0, 11.0], 20), 2) + rng.normal(0, 1e-3, 80)
    tree = trees.from_features(np.stack([lat, lon], 1), branching=(2,), seed=0, coords="latlon")
    parent = tree.parents.numpy()[:80]
    assert np.unique(parent[:40]).size == 1 and np.unique(parent[40:]).size == 1
    assert parent[0] != parent[40]
    # across the antimeridian the two sides are neighbours
    km = trees.latlon_to_km([0.0, 0.0], [179.9, -179.9])
    assert np.linalg.norm(km[0] - km[1]) == pytest.approx(22.2, abs=0.2)


def test_from_features_balance_limits_children():
    # one huge dense blob and a few small ones: k-means would make a giant cluster
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (900, 2)), rng.normal(100, 1, (100, 2))])
    tree = trees.from_features(x, branching=(10,), seed=0, max_children=150)
    children = torch.diff(tree.child_ptr)
    assert int(children[1:].max()) <= 150
    default = trees.from_features(x, branching=(10,), seed=0)
    assert int(torch.diff(default.child_ptr)[1:].max()) <= 4 * 100


def test_from_features_binary_depth_is_bounded():
    # a few far outliers would give 2-means splits of 1 vs n-1 and a path of length ~n
    x = np.concatenate([np.zeros((500, 2)), np.arange(1, 31)[:, None] * [1e6, 0]])
    tree = trees.from_features(x, branching="binary", seed=0, max_fraction=0.75)
    assert tree.depth <= math.ceil(math.log(530) / math.log(1 / 0.75)) + 1


@pytest.mark.parametrize("branching", [(16,), "binary", (4, 4)])
def test_from_features_is_deterministic(branching):
    x = np.random.default_rng(3).normal(size=(300, 3))
    a = trees.from_features(x, branching=branching, seed=5)
    b = trees.from_features(x.copy(), branching=branching, seed=5)
    assert a == b


def test_from_features_branching_shapes():
    x = np.random.default_rng(0).normal(size=(1000, 2))
    flat = trees.from_features(x, branching=(), seed=0)
    assert flat.depth == 1
    two = trees.from_features(x, branching=(4, 4), seed=0)
    assert two.depth == 3
    assert len(two.children(1000)) >= 4


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"features": np.zeros((0, 2))}, ValueError, "shape"),
        ({"features": np.array([[0.0, np.inf]])}, ValueError, "features\\[0, 1\\]"),
        ({"branching": "ternary"}, ValueError, "binary"),
        ({"branching": (1,)}, ValueError, ">= 2"),
        ({"coords": "latlon", "features": np.zeros((3, 3))}, ValueError, "\\(V, 2\\)"),
        ({"coords": "latlon", "features": np.array([[95.0, 0.0]])}, ValueError, "latitude"),
        ({"max_children": 1}, ValueError, "max_children"),
        ({"max_fraction": 1.0}, ValueError, "max_fraction"),
    ],
)
def test_from_features_rejects_bad_input(kwargs, error, message):
    args = {"features": np.zeros((5, 2))} | kwargs
    with pytest.raises(error, match=message):
        trees.from_features(**args)


# ---------------------------------------------------------------------------- co-occurrence


def block_transitions(num_blocks=6, size=20, within=0.95, moves=6000, isolated=0, seed=0):
    rng = np.random.default_rng(seed)
    v = num_blocks * size
    label = rng.permutation(np.repeat(np.arange(num_blocks), size))
    members = [np.flatnonzero(label == b) for b in range(num_blocks)]
    src = rng.integers(0, v, moves)
    same = rng.random(moves) < within
    partner = np.array([rng.choice(members[label[s]]) for s in src])
    dst = np.where(same, partner, rng.integers(0, v, moves))
    t = sp.coo_matrix((np.ones(moves), (src, dst)), shape=(v + isolated, v + isolated)).tocsr()
    return t, np.concatenate([label, np.full(isolated, -1)])


def test_from_cooccurrence_recovers_blocks():
    t, label = block_transitions()
    tree = trees.from_cooccurrence(t, branching=(6,), seed=0)
    parent = tree.parents.numpy()[: label.size]
    for b in range(6):
        assert np.unique(parent[label == b]).size == 1, f"block {b} is split"
    assert purity(tree, label) == 1.0


def test_from_cooccurrence_places_isolated_leaves_and_accepts_dense():
    t, label = block_transitions(num_blocks=4, size=10, moves=2000, isolated=7)
    tree = trees.from_cooccurrence(t.toarray(), branching=(4,), seed=0)
    assert tree.num_leaves == 47
    assert bool((tree.leaf_depth > 0).all())
    assert trees.from_cooccurrence(t, branching=(4,), seed=0) == tree


def test_from_cooccurrence_is_deterministic():
    t, _ = block_transitions(seed=2)
    assert trees.from_cooccurrence(t, seed=1, branching="binary") == trees.from_cooccurrence(
        t, seed=1, branching="binary"
    )


def test_from_cooccurrence_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        trees.from_cooccurrence(np.ones((3, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        trees.from_cooccurrence(-np.ones((3, 3)))
    with pytest.raises(TypeError, match="takes no coords"):
        trees.from_cooccurrence(np.ones((3, 3)), coords="latlon")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_child'"):
        trees.from_cooccurrence(np.ones((4, 4)), max_child=2)


# ------------------------------------------------------------------------------- statistics


def brute_stats(tree: Tree, counts=None) -> dict:
    parents = tree.parents.tolist()
    v = tree.num_leaves
    kids = Counter(p for p in parents if p >= 0)
    lengths, dots = [], []
    for leaf in range(v):
        length = dot = 0
        node = leaf
        while parents[node] >= 0:
            node = parents[node]
            length += 1
            dot += kids[node] - 1
        lengths.append(length)
        dots.append(dot)
    out = {
        "depth_histogram": np.bincount(lengths).tolist(),
        "branching_histogram": dict(Counter(kids.values())),
        "mean_path_length": float(np.mean(lengths)),
        "max_path_length": max(lengths),
        "mean_dot_products": float(np.mean(dots)),
        "max_dot_products": max(dots),
    }
    if counts is not None:
        p = np.asarray(counts, float) / np.sum(counts)
        out["expected_path_length"] = float(p @ lengths)
        out["expected_dot_products"] = float(p @ dots)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tree_stats_match_brute_force(seed):
    tree = random_tree(30 + seed, seed, max_children=6)
    counts = np.random.default_rng(seed).integers(0, 20, tree.num_leaves)
    counts[0] += 1
    stats = trees.tree_stats(tree, counts)
    for key, value in brute_stats(tree, counts).items():
        assert stats[key] == pytest.approx(value), key
    assert stats["num_leaves"] == tree.num_leaves and stats["depth"] == tree.depth
    assert stats["max_dot_products"] == tree.max_path_rows
    assert stats["num_internal"] == sum(stats["branching_histogram"].values())


def test_tree_stats_dot_products_differ_from_path_length():
    tree = Tree.balanced(15_584, 128)
    stats = trees.tree_stats(tree)
    assert stats["mean_path_length"] == 2.0
    assert stats["mean_dot_products"] > 200  # a 128-way node costs 127 dot products
    single = trees.tree_stats(Tree.from_parents([-1]), [3])
    assert single["mean_dot_products"] == 0 and single["entropy_bits"] == 0


def test_tree_stats_rejects_bad_counts():
    with pytest.raises(ValueError, match="length V = 4"):
        trees.tree_stats(Tree.balanced(4), [1, 2])
    with pytest.raises(ValueError, match="all zero"):
        trees.tree_stats(Tree.balanced(4), [0, 0, 0, 0])


# ------------------------------------------------------------------------------ re-treeing


@pytest.mark.parametrize("seed", range(3))
def test_bias_from_log_prob_reproduces_the_distribution(seed):
    tree = random_tree(25, seed)
    rng = np.random.default_rng(seed)
    log_prob = torch.from_numpy(np.log(rng.dirichlet(np.ones(25))))
    log_prob[3] = -math.inf  # a leaf with no mass still gets finite logits
    bias = trees.bias_from_log_prob(tree, log_prob)
    assert torch.isfinite(bias).all()
    weight = torch.zeros(24, 4, dtype=torch.float64)
    hidden = torch.randn(25, 4, dtype=torch.float64)
    got = path_log_prob(hidden, weight, bias, tree, torch.arange(25))
    keep = torch.arange(25) != 3
    expected = log_prob[keep] - torch.logsumexp(log_prob[keep], 0)  # renormalised without leaf 3
    torch.testing.assert_close(got[keep], expected)
    assert float(got[3]) < -25


def test_retree_weights_start_from_the_old_marginal():
    old = random_tree(40, 0)
    new = trees.huffman(np.arange(40) + 1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(39, 6, generator=g, dtype=torch.float64)
    b = torch.randn(39, generator=g, dtype=torch.float64)
    hidden = torch.randn(300, 6, generator=g, dtype=torch.float64)
    weight, bias = trees.retree_weights(old, w, b, new, hidden)
    assert weight.shape == (39, 6) and not weight.any()
    old_lp = path_log_prob(
        hidden.repeat_interleave(40, 0), w, b, old, torch.arange(40).repeat(300)
    ).view(300, 40)
    marginal = torch.logsumexp(old_lp, 0) - math.log(300)
    new_lp = path_log_prob(hidden[:40], weight, bias, new, torch.arange(40))
    torch.testing.assert_close(new_lp, marginal)
    with pytest.raises(ValueError, match="leaves"):
        trees.retree_weights(old, w, b, Tree.balanced(41), hidden)


# -------------------------------------------------------------------------------------- CLI


@pytest.fixture
def inputs(tmp_path):
    x, _ = clustered_points(num_clusters=5, per_cluster=12)
    lat, lon = 47.0 + x[:, 0] / 1000, 8.0 + x[:, 1] / 1000
    rows = "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(zip(lat, lon, strict=True)))
    (tmp_path / "loc.csv").write_text("id,lat,lon\n" + rows)
    counts = np.arange(60) % 7
    (tmp_path / "counts.txt").write_text("count\n" + "\n".join(map(str, counts)) + "\n")
    np.save(tmp_path / "counts.npy", counts)
    t, _ = block_transitions(num_blocks=3, size=20, moves=1500)
    sp.save_npz(tmp_path / "tr.npz", t)
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "balanced", "--num-leaves", "60", "--arity", "3"],
        ["--method", "huffman", "--counts", "{d}/counts.txt"],
        ["--method", "kmeans", "--features", "{d}/loc.csv", "--columns", "lat,lon"]
        + ["--coords", "latlon", "--branching", "5", "--counts", "{d}/counts.npy"],
        ["--method", "kmeans", "--features", "{d}/loc.csv", "--branching", "binary"],
        ["--method", "cooccurrence", "--transitions", "{d}/tr.npz", "--branching", "3,2"],
    ],
)
def test_cli_build_writes_tree_and_prints_stats(inputs, args, capsys):
    from hsoftmax.cli import main

    out = inputs / "t.hst"
    argv = [
        "tree",
        "build",
        *(a.format(d=inputs) for a in args),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dot products" in printed and "60 leaves" in printed
    tree = Tree.load(out)
    assert tree.num_leaves == 60
    assert main(["tree", "stats", str(out), "--counts", str(inputs / "counts.npy")]) == 0
    assert "expected" in capsys.readouterr().out


def test_cli_stats_json(inputs, capsys):
    import json

    from hsoftmax.cli import main

    Tree.balanced(60, 4).save(inputs / "b.hst")
    assert main(["tree", "stats", str(inputs / "b.hst"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_leaves"] == 60 and stats["depth"] == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["build", "--method", "huffman", "--counts", "{d}/missing.npy"], "missing.npy: no such"),
        (["build", "--method", "huffman", "--counts", "{d}/tr.npz"], "tr.npz: not a text"),
        (["build", "--method", "huffman"], "needs --counts"),
        (["build", "--method", "kmeans", "--features", "{d}/loc.csv", "--columns", "x"], "no col"),
        (["build", "--method", "cooccurrence", "--transitions", "{d}/loc.csv"], "loc.csv"),
        (["stats", "{d}/trunc.hst"], "trunc.hst"),
        (["stats", "{d}/good.hst", "--counts", "{d}/counts.npy"], "60 counts"),
    ],
)
def test_cli_errors_name_the_file(inputs, argv, message, capsys):
    from hsoftmax.cli import main

    Tree.balanced(10).save(inputs / "good.hst")
    (inputs / "trunc.hst").write_bytes((inputs / "good.hst").read_bytes()[:50])
    argv = [a.format(d=inputs) for a in argv] + (
        ["--out", str(inputs / "o.hst")] if argv[0] == "build" else []
    )
    assert main(["tree", *argv]) == 1
    assert message in capsys.readouterr().err


def _ancestors(tree, leaf):
    """The internal nodes above ``leaf``, as the set of the leaves below each (ids change)."""
    parents = np.asarray(tree.parents)
    below = {}
    for leaf_id in range(tree.num_leaves):
        node = parents[leaf_id]
        while node >= 0:
            below.setdefault(int(node), set()).add(leaf_id)
            node = parents[node]
    out, node = [], parents[leaf]
    while node >= 0:
        out.append(frozenset(below[int(node)]))
        node = parents[node]
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 10**6), st.integers(2, 5), st.data())
def test_lift_frequent_moves_the_top_leaves_to_the_root(v, seed, max_children, data):
    tree = random_tree(v, seed, max_children)
    counts = np.random.default_rng(seed).integers(0, 5, v)  # many ties: lower id first
    n = data.draw(st.integers(0, v))
    lifted = trees.lift_frequent(tree, counts, n)
    assert lifted.num_leaves == v
    top = sorted(range(v), key=lambda i: (-counts[i], i))[:n]
    root = int(np.flatnonzero(np.asarray(lifted.parents) == -1)[0])
    assert all(int(lifted.parents[i]) == root for i in top)
    # every other leaf keeps its ancestors, less those now holding the same leaves as a child
    # of theirs (spliced) or none; an ancestor's leaf set loses exactly the lifted leaves
    gone = set(top)
    for leaf in set(range(v)) - gone:
        old = [s - gone for s in _ancestors(tree, leaf)]
        new = _ancestors(lifted, leaf)
        assert new[-1] == frozenset(range(v))  # the root holds every leaf
        assert {s - gone for s in new} <= set(old)
        assert len(new) <= len(old)
    assert trees.lift_frequent(tree, counts, 0) is tree
    if n == v:  # all at the root: one flat softmax
        assert lifted.num_nodes == v + 1


def test_lift_frequent_keeps_the_head_a_distribution():
    tree = random_tree(40, 3, 4)
    lifted = trees.lift_frequent(tree, np.arange(40)[::-1], 7)
    head = HierarchicalSoftmax(5, lifted, dtype=torch.float64)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(6, 5, dtype=torch.float64)
    total = head.log_prob_all(hidden).exp().sum(1)
    torch.testing.assert_close(total, torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("counts", "n", "error", "message"),
    [
        (np.ones(9), 3, ValueError, r"counts must have one entry per leaf \(10\)"),
        (np.ones(10), 11, ValueError, r"n must be at most the number of leaves \(10\)"),
        (np.ones(10), -1, ValueError, "n must be"),
        (-np.ones(10), 2, ValueError, "counts must be finite and >= 0"),
    ],
)
def test_lift_frequent_bad_input(counts, n, error, message):
    with pytest.raises(error, match=message):
        trees.lift_frequent(Tree.balanced(10, 2), counts, n)
