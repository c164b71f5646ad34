"""The output heads: one interface suite for HierarchicalSoftmax and DenseSoftmax, exact top-k and
rank against brute force over every leaf, label smoothing, state_dict, errors, op registration."""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsoftmax import DenseSoftmax, HierarchicalSoftmax, Tree, ops, reference
from hsoftmax.nn import Head, rank_by_id, topk_by_id

from conftest import device_params, node_smoothing_reference, random_tree

# ---------------------------------------------------------------------------- helpers


def shuffled_tree(num_leaves: int, seed: int, max_children: int = 6) -> Tree:
    """A random unbalanced tree built from random parents, with the internal node ids shuffled so
    the root is not the last id."""
    rng = np.random.default_rng(seed)
    parents = random_tree(num_leaves, seed, max_children).parents.numpy()
    v, n = num_leaves, parents.size
    perm = np.arange(n)
    perm[v:] = v + rng.permutation(n - v)  # old internal id -> new internal id
    shuffled = np.empty(n, dtype=np.int64)
    shuffled[perm] = np.where(parents >= 0, perm[np.maximum(parents, 0)], -1)
    return Tree.from_parents(shuffled, num_leaves=v)


def caterpillar_tree(num_leaves: int) -> Tree:
    """Depth V - 1: internal node V + i has children leaf i and internal node V + i + 1."""
    v = num_leaves
    parents = np.full(2 * v - 1, -1, dtype=np.int64)
    parents[: v - 1] = v + np.arange(v - 1)
    parents[v - 1] = 2 * v - 2
    parents[v + 1 :] = v + np.arange(v - 2)
    return Tree.from_parents(parents, num_leaves=v)


def one_level_tree(num_leaves: int) -> Tree:
    """A root with V children: the hierarchical softmax is a softmax over [0, W h + b]."""
    return Tree.from_parents([num_leaves] * num_leaves + [-1], num_leaves=num_leaves)


TREES = {
    "V1": lambda: Tree.balanced(1),
    "V2": lambda: Tree.balanced(2),
    "V7-ternary": lambda: Tree.balanced(7, 3),
    "V64-binary": lambda: Tree.balanced(64, 2),
    "V50-one-level": lambda: one_level_tree(50),
    "V40-caterpillar": lambda: caterpillar_tree(40),
    "V300-shuffled": lambda: shuffled_tree(300, seed=3),
    "V1000-random": lambda: random_tree(1000, seed=5, max_children=9),
}
_CACHE: dict[str, Tree] = {}


def get_tree(name: str) -> Tree:
    if name not in _CACHE:
        _CACHE[name] = TREES[name]()
    return _CACHE[name]


def hs_head(tree: Tree, dim: int, seed: int, scale: float = 1.0, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    head = HierarchicalSoftmax(dim, tree, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, scale / dim**0.5)
        if bias:
            head.bias.normal_()
    return head


def dense_head(num_classes: int, dim: int, seed: int, scale: float = 1.0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = DenseSoftmax(dim, num_classes, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, scale / dim**0.5)
        head.bias.normal_()
    return head


def make_head(kind: str, tree: Tree, dim: int = 13, seed: int = 0, **kw):
    if kind == "hs":
        return hs_head(tree, dim, seed, **kw)
    return dense_head(tree.num_leaves, dim, seed, **kw)


def oracle_log_prob_all(head, hidden):
    """Every leaf's log-prob by the independent plain-PyTorch formula."""
    if isinstance(head, HierarchicalSoftmax):
        return reference.log_prob_all(hidden, head.weight, head.bias, head.tree)
    return F.log_softmax(F.linear(hidden, head.weight, head.bias), dim=1)


def brute_topk(log_probs: torch.Tensor, k: int):
    """The tie rule by brute force: stable sort, log-prob descending (ties keep id order)."""
    values, indices = torch.sort(log_probs, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def brute_rank(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    order = torch.sort(log_probs, dim=1, descending=True, stable=True).indices
    position = torch.argsort(order, dim=1)
    return position.gather(1, target[:, None])[:, 0] + 1


def inputs(head, batch: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, head.in_features, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, head.num_classes, (batch,), generator=g)
    return hidden.to(head.weight.dtype), target


HEADS = ["hs", "dense"]

# ---------------------------------------------------------------------------- interface suite


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("tree_name", list(TREES))
def test_log_prob_and_log_prob_all_match_oracle(kind, tree_name):
    tree = get_tree(tree_name)
    head = make_head(kind, tree)
    hidden, target = inputs(head, batch=23, seed=1)
    lp_all = head.log_prob_all(hidden)
    expected = oracle_log_prob_all(head, hidden)
    assert lp_all.shape == (23, tree.num_leaves) and lp_all.dtype == torch.float64
    torch.testing.assert_close(lp_all, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lp_all.logsumexp(1), torch.zeros(23, dtype=torch.float64))
    lp = head.log_prob(hidden, target)
    assert lp.shape == (23,)
    torch.testing.assert_close(lp, expected.gather(1, target[:, None])[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("tree_name", list(TREES))
def test_log_prob_and_mean_match_oracle(kind, tree_name):
    """K classes per row (repeats allowed) and the mean over all V, values and gradients, against
    the plain-PyTorch oracle over every leaf."""
    tree = get_tree(tree_name)
    head = make_head(kind, tree)
    hidden, _ = inputs(head, batch=9, seed=30)
    hidden.requires_grad_()
    g = torch.Generator().manual_seed(31)
    ids = torch.randint(0, tree.num_leaves, (9, 6), generator=g)
    ids[:, 1] = ids[:, 0]
    lp, mean = head.log_prob_and_mean(hidden, ids)
    assert lp.shape == (9, 6) and mean.shape == (9,)
    expected_all = oracle_log_prob_all(head, hidden)
    expected_lp, expected_mean = expected_all.gather(1, ids), expected_all.mean(1)
    torch.testing.assert_close(lp, expected_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=1e-12)
    if tree.num_leaves == 1:
        return  # log p = 0 for the single leaf: constant, nothing to differentiate
    up_lp = torch.randn(9, 6, generator=g, dtype=torch.float64)
    up_mean = torch.randn(9, generator=g, dtype=torch.float64)
    params = [hidden, head.weight, head.bias]
    grad = functools.partial(torch.autograd.grad, allow_unused=True, materialize_grads=True)
    got = grad((lp * up_lp).sum() + (mean * up_mean).sum(), params)
    want = grad((expected_lp * up_lp).sum() + (expected_mean * up_mean).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tree_name", ["V7-ternary", "V300-shuffled", "V1000-random"])
def test_dense_fallback_topk_rank_exact(tree_name):
    """The exact dense fallback that topk/rank use off the CPU (log_prob_all, then a tie-aware
    top-k / comparison count), run here on the CPU through the base class: against brute force,
    with ties, and consistent with itself (the target sits at its rank in the full top-V)."""
    tree = get_tree(tree_name)
    head = make_head("hs", tree, scale=3.0, bias=False)
    hidden, target = inputs(head, batch=17, seed=33)
    hidden[1] = 0.0  # every node uniform (no bias): many exact ties
    lp = oracle_log_prob_all(head, hidden)
    for k in {1, min(10, tree.num_leaves), tree.num_leaves}:  # _topk takes k <= V (topk clamps)
        values, indices = Head._topk(head, hidden, k)
        ref_values, ref_indices = brute_topk(head.log_prob_all(hidden), k)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, lp.gather(1, indices), rtol=0, atol=1e-12)
    rank = Head._rank(head, hidden, target)
    assert torch.equal(rank, brute_rank(head.log_prob_all(hidden), target))
    full = Head._topk(head, hidden, tree.num_leaves)[1]
    assert torch.equal(full.gather(1, (rank - 1)[:, None])[:, 0], target)
    assert torch.equal(head.rank(hidden, target), brute_rank(lp, target))  # the C++ search


@pytest.mark.parametrize("kind", HEADS)
def test_log_prob_and_mean_bad_ids(kind):
    head = make_head(kind, get_tree("V7-ternary"))
    hidden, target = inputs(head, batch=3, seed=32)
    with pytest.raises(ValueError, match=r"ids must have shape \(B, K\) with B = 3"):
        head.log_prob_and_mean(hidden, target)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        head.log_prob_and_mean(hidden, target[:, None].float())
    with pytest.raises(TypeError, match="uint8 and bool index as masks"):
        head.log_prob_and_mean(hidden, target[:, None].to(torch.uint8))
    with pytest.raises(IndexError, match=r"ids\[2, 1\] = 7 is out of range for 7 classes"):
        head.log_prob_and_mean(hidden, torch.tensor([[0, 1], [2, 3], [4, 7]]))


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("tree_name", ["V7-ternary", "V300-shuffled", "V1000-random"])
@pytest.mark.parametrize("k", [1, 5, 10, "V"])
def test_topk_and_rank_match_brute_force(kind, tree_name, k):
    tree = get_tree(tree_name)
    head = make_head(kind, tree, scale=3.0)
    hidden, target = inputs(head, batch=31, seed=2)
    k = tree.num_leaves if k == "V" else k
    values, indices = head.topk(hidden, k)
    k_eff = min(k, tree.num_leaves)
    assert values.shape == indices.shape == (31, k_eff) and indices.dtype == torch.int64
    ref_values, ref_indices = brute_topk(oracle_log_prob_all(head, hidden), k_eff)
    assert torch.equal(indices, ref_indices), (
        f"first mismatch at {(indices != ref_indices).nonzero()[0].tolist()}"
    )
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12)
    rank = head.rank(hidden, target)
    assert rank.dtype == torch.int64
    assert torch.equal(rank, brute_rank(oracle_log_prob_all(head, hidden), target))


@pytest.mark.parametrize("kind", HEADS)
def test_rank_is_position_in_full_topk(kind):
    tree = get_tree("V300-shuffled")
    head = make_head(kind, tree, scale=2.0)
    hidden, target = inputs(head, batch=40, seed=3)
    _, order = head.topk(hidden, tree.num_leaves)
    rank = head.rank(hidden, target)
    assert torch.equal(order.gather(1, (rank - 1)[:, None])[:, 0], target)


@pytest.mark.parametrize("kind", HEADS)
def test_k_above_v_is_clamped(kind):
    tree = get_tree("V7-ternary")
    head = make_head(kind, tree)
    hidden, _ = inputs(head, batch=4, seed=4)
    values, indices = head.topk(hidden, 100)
    assert values.shape == indices.shape == (4, 7)
    assert torch.equal(indices.sort(1).values, torch.arange(7).expand(4, 7))


@pytest.mark.parametrize("kind", HEADS)
def test_exact_ties_follow_the_id_rule(kind):
    # zero weights and bias on a complete binary tree: every leaf has log-prob -6 log 2 exactly
    tree = Tree.balanced(64, 2)
    head = make_head(kind, tree)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    hidden, target = inputs(head, batch=5, seed=5)
    values, indices = head.topk(hidden, 10)
    assert torch.equal(indices, torch.arange(10).expand(5, 10))
    torch.testing.assert_close(values, torch.full((5, 10), -np.log(64), dtype=torch.float64))
    assert torch.equal(head.rank(hidden, target), target + 1)


@pytest.mark.parametrize("kind", HEADS)
def test_duplicated_rows_tie_by_id(kind):
    # one-level tree / dense: classes 3, 9, 17 and 30 get identical logits, tied for the top
    tree = one_level_tree(40)
    head = make_head(kind, tree, scale=0.1)
    offset = 1 if kind == "hs" else 0  # the HS first child has no row
    tied = [3, 9, 17, 30]
    with torch.no_grad():
        for c in tied:
            head.weight[c - offset] = head.weight[tied[0] - offset]
            head.bias[c - offset] = 5.0
    hidden, _ = inputs(head, batch=6, seed=6)
    values, indices = head.topk(hidden, 6)
    assert torch.equal(indices[:, :4], torch.tensor(tied).expand(6, 4))
    assert bool((values[:, :4] == values[:, :1]).all())
    rank = head.rank(hidden, torch.tensor(tied * 2)[:6])
    assert rank.tolist() == [1, 2, 3, 4, 1, 2]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_reference(kind, reduction):
    tree = get_tree("V300-shuffled")
    head = make_head(kind, tree)
    hidden, target = inputs(head, batch=17, seed=7)
    nll = -oracle_log_prob_all(head, hidden).gather(1, target[:, None])[:, 0]
    expected = {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[reduction]
    out = head(hidden, target, reduction=reduction)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_ignore_index_rows_contribute_nothing(kind, label_smoothing):
    tree = get_tree("V300-shuffled")
    head = make_head(kind, tree)
    hidden, target = inputs(head, batch=12, seed=8)
    target[[1, 4, 5]] = -100
    hidden.requires_grad_()
    loss = head(
        hidden, target, reduction="none", ignore_index=-100, label_smoothing=label_smoothing
    )
    assert bool((loss[[1, 4, 5]] == 0).all())
    keep = target != -100
    (grad,) = torch.autograd.grad(loss.sum(), hidden)
    assert bool((grad[~keep] == 0).all()) and bool((grad[keep] != 0).any())
    kept = head(hidden[keep], target[keep], reduction="none", label_smoothing=label_smoothing)
    torch.testing.assert_close(loss[keep], kept)
    mean = head(hidden, target, ignore_index=-100, label_smoothing=label_smoothing)
    torch.testing.assert_close(mean, kept.mean())  # mean over the rows not ignored, like PyTorch
    total = head(
        hidden, target, reduction="sum", ignore_index=-100, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(total, kept.sum())
    # every row ignored: NaN mean (0 / 0), exactly as F.cross_entropy
    assert torch.isnan(head(hidden, torch.full_like(target, -100), ignore_index=-100))


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("tree_name", ["V2", "V7-ternary", "V40-caterpillar", "V1000-random"])
def test_label_smoothing_is_uniform_mixture(kind, tree_name):
    """(1 - eps) * nll + eps * mean over leaves of -log p, against brute force over all leaves."""
    tree = get_tree(tree_name)
    head = make_head(kind, tree)
    hidden, target = inputs(head, batch=9, seed=9)
    eps = 0.3
    lp = oracle_log_prob_all(head, hidden)
    expected = (1 - eps) * -lp.gather(1, target[:, None])[:, 0] + eps * -lp.mean(1)
    out = head(hidden, target, reduction="none", label_smoothing=eps)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)


def test_label_smoothing_equals_dense_on_one_level_tree():
    """A root with V children is a dense softmax over logits [0, W h + b]: the tree's smoothing
    must then be exactly F.cross_entropy(..., label_smoothing=eps)."""
    tree = one_level_tree(30)
    head = hs_head(tree, 11, seed=10)
    hidden, target = inputs(head, batch=14, seed=11)
    target[2] = -1
    logits = F.linear(hidden, head.weight, head.bias)
    logits = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
    for eps in (0.0, 0.1, 1.0):
        for reduction in ("mean", "sum", "none"):
            out = head(hidden, target, reduction, ignore_index=-1, label_smoothing=eps)
            expected = F.cross_entropy(
                logits, target, reduction=reduction, ignore_index=-1, label_smoothing=eps
            )
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_dense_head_equals_cross_entropy():
    head = dense_head(25, 9, seed=12)
    hidden, target = inputs(head, batch=10, seed=13)
    target[0] = 7
    logits = F.linear(hidden, head.weight, head.bias)
    for eps in (0.0, 0.25):
        out = head(hidden, target, ignore_index=7, label_smoothing=eps)
        expected = F.cross_entropy(logits, target, ignore_index=7, label_smoothing=eps)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "tree_name", ["V7-ternary", "V40-caterpillar", "V300-shuffled", "V1000-random"]
)
def test_label_smoothing_and_log_prob_all_gradients(tree_name):
    tree = get_tree(tree_name)
    head = hs_head(tree, 5, seed=14)
    hidden, target = inputs(head, batch=4, seed=15)
    hidden.requires_grad_()
    params = [hidden, head.weight, head.bias]
    loss = head(hidden, target, reduction="sum", label_smoothing=0.4)
    grads = torch.autograd.grad(loss, params)
    lp = reference.log_prob_all(hidden, head.weight, head.bias, tree)
    expected_loss = (0.6 * -lp.gather(1, target[:, None])[:, 0] + 0.4 * -lp.mean(1)).sum()
    expected = torch.autograd.grad(expected_loss, params, retain_graph=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    upstream = torch.randn(4, tree.num_leaves, dtype=torch.float64)
    got = torch.autograd.grad((head.log_prob_all(hidden) * upstream).sum(), params)
    want = torch.autograd.grad((lp * upstream).sum(), params)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", HEADS)
def test_empty_batch(kind):
    head = make_head(kind, get_tree("V7-ternary"))
    hidden = torch.zeros(0, head.in_features, dtype=torch.float64)
    target = torch.zeros(0, dtype=torch.int64)
    assert head(hidden, target, reduction="none").shape == (0,)
    assert head(hidden, target, reduction="sum") == 0
    assert head.log_prob_all(hidden).shape == (0, 7)
    values, indices = head.topk(hidden, 3)
    assert values.shape == indices.shape == (0, 3)
    assert head.rank(hidden, target).shape == (0,)


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("tree_name", ["V1000-random", "V64-binary"])
def test_float32_topk_agrees_with_float64_up_to_rounding(kind, tree_name):
    """float32 runs the SIMD dot products and the float heap keys; a binary tree takes the
    two-child log-sigmoid branch at every node."""
    tree = get_tree(tree_name)
    head64 = make_head(kind, tree, scale=3.0)
    head = copy.deepcopy(head64).float()
    hidden64, target = inputs(head64, batch=30, seed=16)
    hidden = hidden64.float()
    values, indices = head.topk(hidden, 10)
    assert values.dtype == torch.float32
    lp64 = oracle_log_prob_all(head64, hidden64)
    kth = brute_topk(lp64, 10)[0][:, -1:]
    # every returned leaf is in the float64 top 10 up to float32 rounding, values are accurate
    assert bool((lp64.gather(1, indices) >= kth - 1e-4).all())
    torch.testing.assert_close(values.double(), lp64.gather(1, indices), rtol=0, atol=1e-4)
    rank = head.rank(hidden, target)
    lp_y = lp64.gather(1, target[:, None])
    lower = (lp64 > lp_y + 1e-4).sum(1) + 1
    upper = (lp64 >= lp_y - 1e-4).sum(1)
    assert bool(((lower <= rank) & (rank <= upper)).all())


# ---------------------------------------------------------------------------- large trees


@pytest.mark.parametrize("k", [1, 5, 10, "V"])
def test_topk_and_rank_on_20000_leaves(k):
    tree = _CACHE.setdefault("V20000", random_tree(20_000, seed=17, max_children=4))
    head = hs_head(tree, 8, seed=18, scale=2.0)
    hidden, target = inputs(head, batch=6 if k == "V" else 24, seed=19)
    lp = reference.log_prob_all(hidden, head.weight, head.bias, tree)
    k = tree.num_leaves if k == "V" else k
    values, indices = head.topk(hidden, k)
    ref_values, ref_indices = brute_topk(lp, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-11)
    assert torch.equal(head.rank(hidden, target), brute_rank(lp, target))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_leaves=st.integers(1, 120),
    max_children=st.integers(2, 7),
    seed=st.integers(0, 2**16),
    k=st.integers(1, 130),
    scale=st.sampled_from([0.0, 0.5, 4.0]),
)
def test_topk_property(num_leaves, max_children, seed, k, scale):
    tree = shuffled_tree(num_leaves, seed, max_children)
    head = hs_head(tree, 3, seed, scale=scale, bias=scale > 0)
    hidden, target = inputs(head, batch=5, seed=seed)
    lp = reference.log_prob_all(hidden, head.weight, head.bias, tree)
    values, indices = head.topk(hidden, k)
    if scale > 0:  # distinct log-probs: the order is unique
        assert torch.equal(indices, brute_topk(lp, min(k, num_leaves))[1])
        assert torch.equal(head.rank(hidden, target), brute_rank(lp, target))
    # any weights (zero ones tie many leaves): the returned values are a valid top-k
    kth = brute_topk(lp, min(k, num_leaves))[0]
    torch.testing.assert_close(values, kth, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- fallbacks, devices


def test_dense_fallback_matches_search_with_ties():
    """topk_by_id / rank_by_id (the non-CPU path) and the C++ search agree, ties included."""
    tree = Tree.balanced(32, 2)
    head = hs_head(tree, 4, seed=20)
    with torch.no_grad():
        head.weight[::3] = 0.0  # many nodes split 50/50: exact ties between leaves
        head.bias[::3] = 0.0
    hidden, target = inputs(head, batch=20, seed=21)
    lp = head.log_prob_all(hidden)
    for k in (1, 7, 32):
        values, indices = head.topk(hidden, k)
        fb_values, fb_indices = topk_by_id(lp, k)
        assert torch.equal(indices, fb_indices)
        torch.testing.assert_close(values, fb_values, rtol=0, atol=1e-12)
    assert torch.equal(head.rank(hidden, target), rank_by_id(lp, target))


@pytest.mark.parametrize("device", device_params())
def test_heads_on_device(device):
    tree = get_tree("V300-shuffled")
    head = hs_head(tree, 6, seed=22, scale=3.0)
    hidden, target = inputs(head, batch=16, seed=23)
    values, indices = head.topk(hidden, 5)
    rank = head.rank(hidden, target)
    moved = head.to(device)
    h, y = hidden.to(device), target.to(device)
    v_dev, i_dev = moved.topk(h, 5)
    assert torch.equal(i_dev.cpu(), indices)
    torch.testing.assert_close(v_dev.cpu(), values)
    assert torch.equal(moved.rank(h, y).cpu(), rank)


# ---------------------------------------------------------------------------- state_dict


def test_state_dict_round_trip_without_tree_file():
    tree = get_tree("V300-shuffled")
    head = hs_head(tree, 7, seed=24)
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    restored = HierarchicalSoftmax.from_state_dict(state)
    assert restored.tree == tree
    hidden, target = inputs(head, batch=8, seed=25)
    assert torch.equal(restored.log_prob(hidden, target), head.log_prob(hidden, target))
    assert torch.equal(restored.topk(hidden, 4)[1], head.topk(hidden, 4)[1])
    # loading into a head over another tree with the same V replaces that head's tree
    other = HierarchicalSoftmax(7, Tree.balanced(300, 2), dtype=torch.float64)
    other.load_state_dict(state)
    assert other.tree == tree
    assert torch.equal(other.rank(hidden, target), head.rank(hidden, target))
    # a state dict nested in a model, and a whole pickled module
    model = torch.nn.Sequential(torch.nn.Identity(), head)
    nested = HierarchicalSoftmax.from_state_dict(model.state_dict(), prefix="1.")
    assert nested.tree == tree
    buffer = io.BytesIO()
    torch.save(head, buffer)
    buffer.seek(0)
    whole = torch.load(buffer, weights_only=False)
    assert torch.equal(whole.topk(hidden, 3)[1], head.topk(hidden, 3)[1])


def test_load_state_dict_with_other_v_fails_clearly():
    state = hs_head(Tree.balanced(10), 4, seed=26).state_dict()
    head = HierarchicalSoftmax(4, Tree.balanced(12), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="10 leaves but this head has 12"):
        head.load_state_dict(state)


def test_dense_state_dict_round_trip():
    head = dense_head(20, 5, seed=27)
    other = DenseSoftmax(5, 20, dtype=torch.float64)
    other.load_state_dict(head.state_dict())
    hidden, target = inputs(head, batch=3, seed=28)
    assert torch.equal(other(hidden, target), head(hidden, target))


# ---------------------------------------------------------------------------- constructors


def test_no_bias_and_repr():
    head = HierarchicalSoftmax(6, Tree.balanced(9, 3), bias=False)
    assert head.bias is None and head.weight.shape == (8, 6)
    hidden = torch.randn(3, 6)
    assert head.log_prob_all(hidden).shape == (3, 9)
    assert head.topk(hidden, 2)[0].shape == (3, 2)
    assert "num_leaves=9" in repr(head)
    assert DenseSoftmax(6, 9, bias=False).bias is None


def test_from_counts():
    counts = np.array([50, 1, 7, 7, 300, 2, 9])
    head = HierarchicalSoftmax.from_counts(4, counts, arity=2)
    assert head.num_classes == 7 and head.weight.shape == (6, 4)
    depth = head.tree.leaf_depth
    assert depth[4] <= depth[1]  # the most frequent class has the shortest path


def test_from_features():
    features = np.random.default_rng(0).normal(size=(40, 3))
    head = HierarchicalSoftmax.from_features(4, features, branching=4, seed=0)
    assert head.num_classes == 40 and head.weight.shape == (39, 4)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", HEADS)
def test_bad_inputs_name_the_argument(kind):
    head = make_head(kind, get_tree("V7-ternary"))
    hidden, target = inputs(head, batch=3, seed=29)
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, in_features=13\)"):
        head(hidden[:, :5], target)
    with pytest.raises(TypeError, match="hidden dtype torch.float32"):
        head.topk(hidden.float(), 2)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        head.log_prob_all(hidden.numpy())
    with pytest.raises(ValueError, match=r"target must have shape \(B,\) = \(3,\)"):
        head(hidden, target[:2])
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        head.rank(hidden, target.float())
    with pytest.raises(IndexError, match=r"target\[1\] = 7 is out of range for 7 classes"):
        head.rank(hidden, torch.tensor([0, 7, 1]))
    with pytest.raises(IndexError, match=r"target\[0\] = -1 .* or ignore_index=-100"):
        head(hidden, torch.tensor([-1, 0, 1]), ignore_index=-100)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        head.topk(hidden, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        head.topk(hidden, 2.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        head(hidden, target, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        head(hidden, target, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        head(hidden, target, ignore_index=1.0)


def test_head_from_a_tree_file(tmp_path):
    tree = Tree.from_parents([5, 5, 6, 6, 7, 7, 7, -1])
    tree.save(tmp_path / "t.hst")
    torch.manual_seed(0)
    from_file = HierarchicalSoftmax(3, tmp_path / "t.hst")
    torch.manual_seed(0)
    from_tree = HierarchicalSoftmax(3, tree)
    assert torch.equal(from_file.tree.parents, tree.parents)
    hidden, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(from_file(hidden, target), from_tree(hidden, target))
    with pytest.raises(FileNotFoundError):
        HierarchicalSoftmax(3, str(tmp_path / "missing.hst"))


def test_constructor_errors():
    with pytest.raises(TypeError, match="tree must be an hsoftmax.Tree or a tree file's path"):
        HierarchicalSoftmax(4, [0, 1])
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        HierarchicalSoftmax(0, Tree.balanced(3))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        DenseSoftmax(4, 0)


def test_kernels_check_their_arguments():
    head = hs_head(Tree.balanced(8), 3, seed=30)
    hidden = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, V=8\]"):
        ops.topk_leaves(hidden, head.weight.detach(), None, head.tree, 9)
    with pytest.raises(IndexError, match=r"target\[1\] = 8 is out of range"):
        ops.leaf_rank(hidden, head.weight.detach(), None, head.tree, torch.tensor([0, 8]))


# ---------------------------------------------------------------------------- registration


def test_opcheck_search_ops():
    head = hs_head(get_tree("V300-shuffled"), 6, seed=31)
    st = head.tree.search_tables()
    hidden, target = inputs(head, batch=5, seed=32)
    w, b = head.weight.detach(), head.bias.detach()
    tree_args = (st.child_ptr, st.children, st.node_row_ptr)
    path_args = (st.leaf_path_ptr, st.path_node, st.path_choice)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.hsoftmax.topk_leaves.default,
        (hidden, w, b, *tree_args, st.root, 4),
        test_utils=checks,
    )
    torch.library.opcheck(
        torch.ops.hsoftmax.leaf_rank.default,
        (hidden, w, None, *tree_args, *path_args, st.root, target),
        test_utils=checks,
    )
    torch.library.opcheck(
        torch.ops.hsoftmax.leaf_log_prob_all.default,
        (hidden, w, b, *tree_args, st.root),
        test_utils=checks,
    )


def test_topk_under_torch_compile():
    head = hs_head(get_tree("V300-shuffled"), 6, seed=33)
    hidden, _ = inputs(head, batch=4, seed=34)
    compiled = torch.compile(lambda h: head.topk(h, 3), backend="eager", fullgraph=True)
    assert torch.equal(compiled(hidden)[1], head.topk(hidden, 3)[1])


def test_retree_keeps_the_average_prediction():
    """head.retree(new_tree): a head over another tree whose distribution equals the old
    head's average prediction over the given hidden states."""
    g = torch.Generator().manual_seed(3)
    v, d = 40, 6
    old = HierarchicalSoftmax(d, Tree.balanced(v, 2))
    with torch.no_grad():
        old.weight.normal_(generator=g)
        old.bias.normal_(generator=g)
    hidden = torch.randn(25, d, generator=g)
    new_tree = Tree.balanced(v, 3)
    new = old.retree(new_tree, hidden)
    assert new.tree == new_tree and new.weight.shape == (v - 1, d)
    assert torch.count_nonzero(new.weight) == 0
    expected = old.log_prob_all(hidden).exp().mean(0)
    got = new.log_prob_all(torch.randn(3, d, generator=g)).exp()
    for row in got:
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tree_name", ["V64-binary", "V1000-random", "V40-caterpillar"])
def test_search_values_are_log_prob_bits(dtype, tree_name):
    """On the CPU, topk's values are log_prob's values bit for bit (same dot products, node
    formulas and root-first sum), so topk, rank and log_prob order ties the same way."""
    tree = get_tree(tree_name)
    head = hs_head(tree, 13, seed=7, scale=3.0, dtype=dtype)
    hidden = torch.randn(9, 13, dtype=dtype, generator=torch.Generator().manual_seed(8))
    values, ids = head.topk(hidden, tree.num_leaves)
    with torch.no_grad():
        lp = torch.stack([head.log_prob(hidden, ids[:, j]) for j in range(ids.shape[1])], 1)
    assert torch.equal(values, lp)


@pytest.mark.parametrize("tree_name", ["V64-binary", "V1000-random", "V1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_ranking_log_prob_all_has_the_search_bits(tree_name, dtype, bias):
    """The searches score nodes one at a time and, for binary nodes, several queries' at once
    (rounds of 8 interleaved searches, refilled as they finish); the all-leaves scorer scores
    tiles of 16 queries node by node, 4 queries at a time plus a remainder (23 queries: every
    case, on 1 or 2 threads). All must be the same bits."""
    tree = get_tree(tree_name)
    head = hs_head(tree, 13, seed=9, scale=2.0, dtype=dtype, bias=bias)
    hidden = torch.randn(23, 13, dtype=dtype, generator=torch.Generator().manual_seed(10))
    lp = head.ranking_log_prob_all(hidden)
    values, ids = head.topk(hidden, tree.num_leaves)
    assert torch.equal(lp.gather(1, ids), values)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(lp, oracle_log_prob_all(head, hidden), rtol=0, atol=tol)
    dense = make_head("dense", tree)
    torch.testing.assert_close(
        dense.ranking_log_prob_all(inputs(dense, 3, 1)[0]),
        dense.log_prob_all(inputs(dense, 3, 1)[0]),
    )


# ------------------------------------------------------------------ node-level label smoothing


@pytest.mark.parametrize(
    "tree_name", ["V7-ternary", "V64-binary", "V40-caterpillar", "V1000-random"]
)
def test_node_smoothing_against_brute_force(tree_name):
    tree = get_tree(tree_name)
    head = hs_head(tree, 5, seed=40, scale=2.0)
    hidden, target = inputs(head, batch=11, seed=41)
    hidden.requires_grad_()
    got = head(hidden, target, label_smoothing=0.3, smoothing="nodes", reduction="none")
    want = node_smoothing_reference(head, hidden, target, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    params = [hidden, head.weight, head.bias]
    for a, b in zip(
        torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_node_smoothing_without_bias_equals_a_zero_bias():
    tree = get_tree("V1000-random")
    plain = hs_head(tree, 5, seed=50, scale=2.0, bias=False)
    zero = hs_head(tree, 5, seed=50, scale=2.0)
    with torch.no_grad():
        zero.weight.copy_(plain.weight)
        zero.bias.zero_()
    hidden, target = inputs(plain, batch=9, seed=51)
    hidden.requires_grad_()
    got = plain(hidden, target, label_smoothing=0.2, smoothing="nodes", reduction="none")
    want = node_smoothing_reference(zero, hidden, target, 0.2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(got.sum(), [hidden, plain.weight]),
        torch.autograd.grad(want.sum(), [hidden, zero.weight]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_nll_and_smoothing_gives_the_two_terms_of_the_loss():
    tree = get_tree("V1000-random")
    head = hs_head(tree, 5, seed=47, scale=2.0)
    hidden, target = inputs(head, batch=7, seed=48)
    nll, nodes = head.nll_and_smoothing(hidden, target, "nodes")
    torch.testing.assert_close(nll, -head.log_prob_all(hidden).gather(1, target[:, None])[:, 0])
    torch.testing.assert_close(nodes, node_smoothing_reference(head, hidden, target, 1.0))
    nll2, leaves = head.nll_and_smoothing(hidden, target)  # "leaves" by default
    torch.testing.assert_close(nll2, nll)
    torch.testing.assert_close(leaves, -head.log_prob_all(hidden).mean(1))
    dense = make_head("dense", tree)
    h, y = inputs(dense, batch=5, seed=49)
    d_nll, d_nodes = dense.nll_and_smoothing(h, y, "nodes")
    lp = F.log_softmax(F.linear(h, dense.weight, dense.bias), 1)
    torch.testing.assert_close(d_nll, -lp.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(d_nodes, -lp.mean(1))
    with pytest.raises(ValueError, match="smoothing must be 'leaves' or 'nodes'"):
        head.nll_and_smoothing(hidden, target, "paths")
    with pytest.raises(IndexError):
        head.nll_and_smoothing(hidden, torch.full_like(target, 1000), "nodes")


def test_node_smoothing_equals_cross_entropy_on_a_one_level_tree():
    tree = get_tree("V50-one-level")
    head = hs_head(tree, 6, seed=42, scale=2.0)
    hidden, target = inputs(head, batch=13, seed=43)
    logits = torch.cat([hidden.new_zeros(13, 1), F.linear(hidden, head.weight, head.bias)], 1)
    for reduction in ("mean", "none"):
        want = F.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
        got = head(hidden, target, label_smoothing=0.1, smoothing="nodes", reduction=reduction)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dense = make_head("dense", tree)
    h, y = inputs(dense, batch=5, seed=44)
    assert torch.equal(
        dense(h, y, label_smoothing=0.2, smoothing="nodes"), dense(h, y, label_smoothing=0.2)
    )


def test_node_smoothing_with_ignore_index_float32_and_bad_mode():
    tree = get_tree("V1000-random")
    head = hs_head(tree, 5, seed=45, dtype=torch.float32)
    hidden, target = inputs(head, batch=6, seed=46)
    target[2] = -100
    loss = head(hidden, target, ignore_index=-100, label_smoothing=0.1, smoothing="nodes",
                reduction="none")  # fmt: skip
    assert loss[2] == 0 and bool(torch.isfinite(loss).all()) and loss.dtype == torch.float32
    ref = node_smoothing_reference(
        copy.deepcopy(head).double(), hidden.double(), target.clamp(min=0), 0.1
    )
    keep = target != -100
    torch.testing.assert_close(loss[keep].double(), ref[keep], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="smoothing must be 'leaves' or 'nodes'"):
        head(hidden, target.clamp(min=0), label_smoothing=0.1, smoothing="paths")
