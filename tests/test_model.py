"""HistoryCentricModel and the history module: shapes, masks, normalisation, exact top-k/rank
against brute force over all classes, NaN-free gradients, the parameter budget."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hsoftmax.data import MobilityDataset, SampleSet, collate
from hsoftmax.data.dataset import batch_context, sample_context
from hsoftmax.models import (
    HistoryEncoder,
    HistoryMixture,
    HistoryScorer,
    ParameterBudgetError,
    PointerScorer,
    UserMemory,
    build_model,
    check_budget,
    masked_logsumexp,
    parameter_report,
)
from hsoftmax.nn import DenseSoftmax, HierarchicalSoftmax, rank_by_id, topk_by_id
from hsoftmax.tree import Tree

from conftest import node_smoothing_reference, random_tree

V, USERS = 37, 5
TINY = {
    "loc_emb_dim": 8,
    "user_emb_dim": 4,
    "time_emb_dim": 4,
    "weekday_emb_dim": 2,
    "duration_emb_dim": 4,
    "diff_emb_dim": 2,
    "d_model": 16,
    "num_layers": 2,
    "nhead": 2,
    "dim_feedforward": 32,
    "dropout": 0.0,
}
# (head, tree, history) combinations a config can name
VARIANTS = [
    ("hsoftmax", "kmeans", "mixture"),
    ("hsoftmax", "huffman", "none"),
    ("hsoftmax", "balanced", "mixture"),
    ("dense", "kmeans", "mixture"),
    ("dense", "kmeans", "logit_add"),
    ("dense", "kmeans", "none"),
]


def fake_data(v: int = V, users: int = USERS, seed: int = 0):
    rng = np.random.default_rng(seed)
    locs = pd.DataFrame(
        {
            "loc": np.arange(2, v),
            "id": np.arange(v - 2),
            "lat": -7.8 + 0.1 * rng.random(v - 2),
            "lon": 110.4 + 0.1 * rng.random(v - 2),
        }
    )
    day = rng.integers(0, 60, 500)
    train = SimpleNamespace(  # one history stay per sample: what sample_context reads
        y=rng.integers(1, v, 500),
        sample_user=rng.integers(1, users, 500),
        hist_end=np.arange(1, 501),
        start_min=rng.integers(0, 1440, 500),
        dur=rng.integers(0, 3000, 500),
        weekday=rng.integers(0, 7, 500),
        day=day,
        target_day=day + rng.integers(0, 8, 500),
    )
    return SimpleNamespace(n_locations=v, n_users=users, locations=locs, train=train)


def fake_batch(b: int = 9, length: int = 7, v: int = V, seed: int = 0) -> dict:
    """Right-padded batch with repeated window locations; half the targets lie in the window."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = torch.randint(2, min(v, 12), (b, length), generator=g)  # few ids: repeats
    batch = {
        "x": x,
        "time": torch.randint(0, 96, (b, length), generator=g),
        "weekday": torch.randint(0, 7, (b, length), generator=g),
        "duration": torch.randint(0, 96, (b, length), generator=g),
        "diff": torch.randint(0, 8, (b, length), generator=g),
    }
    for k in batch:
        batch[k] = batch[k].masked_fill(~mask, 0)
    y = torch.randint(1, v, (b,), generator=g)
    y[::2] = x[::2, 0]  # in the window
    batch.update(mask=mask, lengths=lengths, user=torch.randint(1, USERS, (b,), generator=g), y=y)
    return batch


def make(head="hsoftmax", tree="kmeans", history="mixture", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = {**TINY, "head": head, "tree": tree, "history": history, "tree_branching": 4, **kw}
    return build_model(cfg, fake_data()).to(dtype).eval()


@pytest.mark.parametrize(("head", "tree", "history"), VARIANTS)
def test_shapes(head, tree, history):
    model = make(head, tree, history)
    batch = fake_batch()
    b = batch["y"].shape[0]
    assert model.encoder(batch).shape == (b, TINY["d_model"])
    assert model.log_prob(batch).shape == (b,)
    assert model.log_prob_all(batch).shape == (b, V)
    values, idx = model.topk(batch, 10)
    assert values.shape == idx.shape == (b, 10)
    assert model.rank(batch).shape == (b,)
    loss = model(batch, label_smoothing=0.05)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_padding_does_not_change_outputs():
    model = make()
    batch = fake_batch()
    ref = model.log_prob(batch)
    # two more padded columns, with garbage at every padded position
    wide = {}
    for k in ("x", "time", "weekday", "duration", "diff"):
        wide[k] = torch.cat([batch[k], torch.zeros(batch[k].shape[0], 2, dtype=torch.long)], 1)
    mask = torch.cat([batch["mask"], torch.zeros(batch["mask"].shape[0], 2, dtype=torch.bool)], 1)
    garbage = {"x": 5, "time": 17, "weekday": 3, "duration": 9, "diff": 2}
    for k, val in garbage.items():
        wide[k] = wide[k].masked_fill(~mask, val)
    wide.update(mask=mask, lengths=batch["lengths"], user=batch["user"], y=batch["y"])
    torch.testing.assert_close(model.log_prob(wide), ref)
    torch.testing.assert_close(model.rank(wide), model.rank(batch))


def test_causal_mask():
    model = make()
    batch = fake_batch(b=2, length=6)
    batch["mask"][:] = True
    batch["lengths"][:] = 6
    out = model.encoder(batch, all_positions=True)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["x"][:, 3] = 30
    changed["time"][:, 3] = 90
    out2 = model.encoder(changed, all_positions=True)
    torch.testing.assert_close(out2[:, :3], out[:, :3])  # earlier positions do not see it
    assert (out2[:, 3:] - out[:, 3:]).abs().amax() > 1e-6


@pytest.mark.parametrize(("head", "tree", "history"), VARIANTS)
def test_distribution_sums_to_one_and_matches_log_prob(head, tree, history):
    model = make(head, tree, history)
    batch = fake_batch()
    all_lp = model.log_prob_all(batch)
    torch.testing.assert_close(all_lp.exp().sum(1), torch.ones(all_lp.shape[0], dtype=all_lp.dtype))
    torch.testing.assert_close(model.log_prob(batch), all_lp.gather(1, batch["y"][:, None])[:, 0])


@pytest.mark.parametrize(("head", "tree", "history"), VARIANTS)
def test_label_smoothing_is_exact(head, tree, history):
    model = make(head, tree, history)
    batch = fake_batch()
    eps = 0.1
    all_lp = model.log_prob_all(batch)
    nll = -all_lp.gather(1, batch["y"][:, None])[:, 0]
    ref = ((1 - eps) * nll - eps * all_lp.mean(1)).mean()
    torch.testing.assert_close(model(batch, label_smoothing=eps), ref)


def _brute(model, batch, k):
    all_lp = model.log_prob_all(batch)
    return topk_by_id(all_lp, min(k, all_lp.shape[1])), rank_by_id(all_lp, batch["y"])


@pytest.mark.parametrize(("head", "tree", "history"), VARIANTS)
@pytest.mark.parametrize("k", [1, 5, 10, V + 3])
def test_exact_topk_and_rank_against_brute_force(head, tree, history, k):
    model = make(head, tree, history)
    for seed in range(3):
        batch = fake_batch(b=16, seed=seed)
        (ref_v, ref_i), ref_rank = _brute(model, batch, k)
        values, idx = model.topk(batch, k)
        assert torch.equal(idx, ref_i), (idx, ref_i)
        torch.testing.assert_close(values, ref_v)
        assert torch.equal(model.rank(batch), ref_rank)
        # the ranks are consistent with the top-k lists
        full_idx = model.topk(batch, V)[1]
        pos = (full_idx == batch["y"][:, None]).int().argmax(1) + 1
        assert torch.equal(pos, ref_rank)


def test_mixture_with_any_head_on_random_trees():
    """The mixture wrapper alone, over unbalanced random trees and a dense head."""
    g = torch.Generator().manual_seed(1)
    for head in [HierarchicalSoftmax(6, random_tree(23, s), dtype=torch.float64) for s in (0, 1)]:
        for scorer in (HistoryScorer(), PointerScorer(6, d_key=4)):
            _check_mixture(HistoryMixture(head, 6, scorer).double(), 23, g)
    _check_mixture(HistoryMixture(DenseSoftmax(6, 23).double(), 6).double(), 23, g)


def _check_mixture(mix, v, g):
    """Windows with gaps and with class 0 as a real location: the contract is only ``valid``."""
    with torch.no_grad():
        mix.gate.bias.fill_(0.4)
        mix.gate.weight.normal_(generator=g)
    hidden = torch.randn(12, 6, dtype=torch.float64, generator=g)
    loc = torch.randint(0, v, (12, 5), generator=g)
    valid = torch.rand(12, 5, generator=g) < 0.8
    valid[:, 0] = True
    loc = loc.masked_fill(~valid, 0)
    states = torch.randn(12, 5, 6, dtype=torch.float64, generator=g)
    window = mix.scorer(loc, valid, hidden, states)
    y = torch.randint(0, v, (12,), generator=g)
    y[:6] = loc[:6, 0]
    all_lp = mix.log_prob_all(hidden, window)
    torch.testing.assert_close(all_lp.exp().sum(1), torch.ones(12, dtype=torch.float64))
    for k in (1, 4, v):
        ref_v, ref_i = topk_by_id(all_lp, k)
        values, idx = mix.topk(hidden, window, k)
        assert torch.equal(idx, ref_i)
        torch.testing.assert_close(values, ref_v)
    assert torch.equal(mix.rank(hidden, window, y), rank_by_id(all_lp, y))


@pytest.mark.parametrize(("first_k", "max_k"), [(1, 4), (2, 10**9), (8, 2048)])
@pytest.mark.parametrize("ties", [False, True])
def test_mixture_in_window_rank_search_against_brute_force(monkeypatch, first_k, max_k, ties):
    """Targets inside the window, tree heads on the CPU: the count of outside classes beating
    the target comes from the head's grown top-k (and, past ``max_k``, from scoring all
    classes). ``ties``: zero weights and integer biases, so many head values are equal and the
    tie-breaks decide. Both paths must give the brute-force rank, and both must be taken."""
    monkeypatch.setattr(HistoryMixture, "_SEARCH_FIRST_K", first_k)
    monkeypatch.setattr(HistoryMixture, "_SEARCH_MAX_K", max_k)
    calls = {"topk": 0, "all": 0}
    g = torch.Generator().manual_seed(7)
    v = 40
    for s in range(6):
        head = HierarchicalSoftmax(5, random_tree(v, s), dtype=torch.float64)
        if ties:
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.randint(-1, 2, head.bias.shape, generator=g).double())
        topk, full = head.topk, head.ranking_log_prob_all

        def count_topk(*a, _f=topk):
            calls["topk"] += 1
            return _f(*a)

        def count_all(*a, _f=full):
            calls["all"] += 1
            return _f(*a)

        monkeypatch.setattr(head, "topk", count_topk)
        monkeypatch.setattr(head, "ranking_log_prob_all", count_all)
        mix = HistoryMixture(head, 5, scorer=HistoryScorer()).double()
        with torch.no_grad():
            mix.gate.bias.uniform_(-3, 3, generator=g)
            mix.gate.weight.normal_(generator=g)
        hidden = torch.randn(32, 5, dtype=torch.float64, generator=g)
        loc = torch.randint(0, v, (32, 6), generator=g)
        valid = torch.rand(32, 6, generator=g) < 0.7
        valid[:, 0] = True
        window = mix.scorer(loc.masked_fill(~valid, 0), valid)
        y = torch.randint(0, v, (32,), generator=g)
        y[:24] = loc[:24, 0]  # most targets inside the window
        want = rank_by_id(mix.log_prob_all(hidden, window), y)
        assert torch.equal(mix.rank(hidden, window, y), want)
    assert calls["topk"] > 0
    assert (calls["all"] > 0) == (max_k < v)


def test_mixture_rank_never_counts_the_target_against_itself():
    """A target whose window holds it twice: its own positions are scored in another element
    of the same vector op and may differ from its value by an ulp; they must not beat it."""
    torch.manual_seed(0)
    head = DenseSoftmax(3, 4, dtype=torch.float64)
    mix = HistoryMixture(head, 3, scorer=HistoryScorer()).double()
    for _ in range(50):
        with torch.no_grad():
            mix.gate.weight.normal_()
        hidden = torch.randn(24, 3, dtype=torch.float64)
        window = mix.scorer(torch.ones(24, 2, dtype=torch.long), torch.ones(24, 2, dtype=bool))
        y = torch.ones(24, dtype=torch.long)
        want = rank_by_id(mix.log_prob_all(hidden, window), y)
        assert torch.equal(mix.rank(hidden, window, y), want)


def test_mixture_with_an_empty_window_is_the_head():
    g = torch.Generator().manual_seed(3)
    head = HierarchicalSoftmax(6, random_tree(11, 2), dtype=torch.float64)
    mix = HistoryMixture(head, 6, HistoryScorer()).double()
    with torch.no_grad():
        mix.gate.bias.fill_(1.5)  # g = 0.82 where a window exists
    hidden = torch.randn(4, 6, dtype=torch.float64, generator=g)
    loc = torch.tensor([[3, 5, 0], [0, 0, 0], [7, 0, 0], [0, 0, 0]])
    valid = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    window = mix.scorer(loc, valid)
    all_lp = mix.log_prob_all(hidden, window)
    torch.testing.assert_close(all_lp.exp().sum(1), torch.ones(4, dtype=torch.float64))
    empty = torch.tensor([1, 3])
    torch.testing.assert_close(all_lp[empty], head.log_prob_all(hidden[empty]))
    y = torch.tensor([3, 4, 7, 9])
    nll = mix(hidden, window, y, reduction="none")
    torch.testing.assert_close(nll[empty], head(hidden[empty], y[empty], reduction="none"))
    smoothed = mix(hidden, window, y, reduction="none", label_smoothing=0.1)
    want = -(0.9 * all_lp.gather(1, y[:, None])[:, 0] + 0.1 * all_lp.mean(1))
    torch.testing.assert_close(smoothed, want)
    assert torch.equal(mix.rank(hidden, window, y), rank_by_id(all_lp, y))
    assert torch.equal(mix.topk(hidden, window, 5)[1], topk_by_id(all_lp, 5)[1])


@pytest.mark.parametrize("history", ["mixture", "logit_add"])
def test_gradients_are_finite(history):
    head = "dense" if history == "logit_add" else "hsoftmax"
    model = make(head, "kmeans", history, dtype=torch.float32).train()
    batch = fake_batch()
    batch["y"][1::2] = V - 1  # outside every window (ids < 12 there)
    for eps in (0.0, 0.05):
        model.zero_grad()
        model(batch, label_smoothing=eps).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert model.output.scorer.decay_raw.grad is not None


def test_masked_logsumexp_empty_mask_has_no_nan_gradient():
    x = torch.tensor([[1.0, float("-inf"), 2.0], [0.5, 0.25, 3.0]], requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out = masked_logsumexp(x, mask, dim=1)
    assert out[0] == float("-inf")
    torch.testing.assert_close(out[1], torch.logsumexp(torch.tensor([0.5, 3.0]), 0))
    out[1].backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() == 0


def test_logit_add_needs_dense_head():
    with pytest.raises(ValueError, match="logit_add"):
        make("hsoftmax", "kmeans", "logit_add")


def test_unknown_model_key():
    with pytest.raises(KeyError, match="d_modle"):
        build_model({"d_modle": 3}, fake_data())


def test_parameter_report_and_budget():
    model = make("hsoftmax", "kmeans", "mixture", dtype=torch.float32)
    report = parameter_report(model)
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["head"] == (V - 1) * (TINY["d_model"] + 1)  # V - 1 rows + biases
    d, key = TINY["d_model"], 32
    assert report["history"] == (d * key + key) + d * key + 1 + (d + 1)  # pointer + gate
    check_budget(report, report["total"])  # at the budget: fine
    with pytest.raises(ParameterBudgetError, match="over the budget"):
        check_budget(report, report["total"] - 1)
    check_budget(report, report["total"] - 1, allow_over=True)


def test_seed_configuration_fits_the_budget_on_diy_size():
    """The seed's configuration at the diy vocabulary (15,602 classes, 778 users): under 3M."""
    data = fake_data(v=15_602, users=778)
    for head in ("hsoftmax", "dense"):
        torch.manual_seed(0)
        model = build_model({"head": head, "tree": "balanced", "history": "mixture"}, data)
        report = parameter_report(model)
        assert report["total"] <= 3_000_000, report
        dense_extra = 112 + 1 if head == "dense" else 0  # the dense head has one more row
        assert report["head"] == 15_601 * 113 + dense_extra


def test_mixture_topk_takes_a_numpy_int_like_the_heads():
    head = DenseSoftmax(3, 6, dtype=torch.float64)
    mix = HistoryMixture(head, 3, scorer=HistoryScorer()).double()
    hidden = torch.randn(2, 3, dtype=torch.float64)
    window = mix.scorer(torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1, 1], [1, 0]], dtype=bool))
    values, idx = mix.topk(hidden, window, np.int64(4))
    assert torch.equal(idx, mix.topk(hidden, window, 4)[1]) and idx.shape == (2, 4)
    with pytest.raises(TypeError, match="k must be an int"):
        mix.topk(hidden, window, True)


@pytest.mark.parametrize("head_kind", ["tree", "dense"])
def test_mixture_topk_and_rank_agree_on_rounding_ties(head_kind):
    """Zero weights and integer biases: many classes' head log-probs are exactly equal, and
    adding log(1 - g) makes more of them equal by rounding. topk(V) must still list every
    target at its rank, inside and outside the window."""
    torch.manual_seed(0)
    v = 16
    for _ in range(40):
        if head_kind == "tree":
            head = HierarchicalSoftmax(3, Tree.balanced(v, 2), dtype=torch.float64)
        else:
            head = DenseSoftmax(3, v, dtype=torch.float64)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.randint(-1, 2, head.bias.shape).double())
        mix = HistoryMixture(head, 3, scorer=HistoryScorer()).double()
        with torch.no_grad():
            mix.gate.bias.uniform_(-2, 2)
        hidden = torch.randn(6, 3, dtype=torch.float64)
        loc = torch.randint(0, v, (6, 2))
        window = mix.scorer(loc, torch.ones(6, 2, dtype=torch.bool))
        y = torch.randint(0, v, (6,))
        y[:2] = loc[:2, 0]  # two targets inside the window
        rank = mix.rank(hidden, window, y)
        _, order = mix.topk(hidden, window, v)
        assert torch.equal(order.gather(1, (rank - 1)[:, None])[:, 0], y)
        assert torch.equal(order.sort(1).values, torch.arange(v).expand(6, v))


def test_mixture_refuses_window_ids_out_of_range():
    head = DenseSoftmax(3, 6, dtype=torch.float64)
    mix = HistoryMixture(head, 3, scorer=HistoryScorer()).double()
    hidden = torch.randn(2, 3, dtype=torch.float64)
    window = mix.scorer(torch.tensor([[1, 9], [2, 0]]), torch.tensor([[1, 1], [1, 0]], dtype=bool))
    with pytest.raises(IndexError, match=r"window.loc\[0, 1\] = 9 is out of range for 6 classes"):
        mix(hidden, window, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="window.loc must have shape"):
        mix.rank(hidden[:1], window, torch.tensor([1]))
    ok = mix.scorer(torch.tensor([[1, 5], [2, 0]]), torch.tensor([[1, 1], [1, 0]], dtype=bool))
    assert torch.isfinite(mix(hidden, ok, torch.tensor([1, 2])))


def test_node_smoothing_through_the_model():
    model = make("hsoftmax", "balanced", "none", smoothing="nodes")
    batch = fake_batch()
    hidden, _ = model.hidden_and_window(batch)
    want = model.head(hidden, batch["y"], label_smoothing=0.1, smoothing="nodes")
    torch.testing.assert_close(model(batch, label_smoothing=0.1), want)
    leaves = model.head(hidden, batch["y"], label_smoothing=0.1)
    assert not torch.allclose(want, leaves)  # a different objective on a deep tree
    with pytest.raises(ValueError, match="smoothing 'nodes' .* not with history 'logit_add'"):
        make("dense", "balanced", "logit_add", smoothing="nodes")


@pytest.mark.parametrize(
    ("head", "tree"), [("hsoftmax", "balanced"), ("hsoftmax", "kmeans"), ("dense", "kmeans")]
)
def test_node_smoothing_in_the_mixture(head, tree):
    """(1 - eps) * mixture NLL (brute force over all classes) + eps * the head's node term."""
    model = make(head, tree, "mixture", smoothing="nodes")
    with torch.no_grad():
        model.output.gate.bias.fill_(0.7)
    batch = fake_batch()
    y, eps = batch["y"], 0.2
    hidden, _ = model.hidden_and_window(batch)
    nll = -model.log_prob_all(batch).gather(1, y[:, None])[:, 0]
    if head == "dense":
        term = -model.head.log_prob_all(hidden).mean(1)
    else:
        term = node_smoothing_reference(model.head, hidden, y, 1.0)
    want = ((1 - eps) * nll + eps * term).mean()
    got = model(batch, label_smoothing=eps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want, strict=True):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    leaves = make(head, tree, "mixture")  # same weights (seed 0), the mixture's own smoothing
    with torch.no_grad():
        leaves.output.gate.bias.fill_(0.7)
    if head == "hsoftmax":  # a different objective on a deep tree; the same without smoothing
        assert not torch.allclose(leaves(batch, label_smoothing=eps), got)
    torch.testing.assert_close(leaves(batch), model(batch), rtol=0, atol=0)


def test_encoder_sizes_default_and_unknown_ones_are_refused():
    from hsoftmax.models.history_centric import ENCODER_DEFAULTS

    enc = HistoryEncoder(30, 5, d_model=16, nhead=2, num_layers=1, dim_feedforward=8)
    assert enc.loc_emb.embedding_dim == ENCODER_DEFAULTS["loc_emb_dim"]
    assert len(enc.layers.layers) == 1 and enc.d_model == 16
    widths = sum(v for k, v in ENCODER_DEFAULTS.items() if k.endswith("_emb_dim"))
    assert enc.input_proj.in_features == widths
    with pytest.raises(TypeError, match=r"unknown sizes \['loc_dim'\]"):
        HistoryEncoder(30, 5, loc_dim=8)


def test_user_memory_tables_against_counting():
    rng = np.random.default_rng(3)
    user, y = rng.integers(1, 6, 400), rng.integers(2, 30, 400)
    loc, count = UserMemory.tables(user, y, n_users=7, size=5)
    for u in range(7):
        counts = Counter(y[user == u].tolist())
        expect = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        expect += [(0, 0)] * (5 - len(expect))  # empty slots: id 0, count 0
        assert list(zip(loc[u].tolist(), count[u].tolist(), strict=True)) == expect, u


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("head", ["hsoftmax", "dense"])
def test_user_memory_keeps_topk_and_rank_exact(head, context):
    model = make(head, "kmeans", "mixture", user_memory=6, user_memory_context=context)
    assert model.memory is not None
    assert (model.memory.context_count is not None) == context
    for seed in range(3):
        batch = fake_batch(b=16, seed=seed)
        lp = model.log_prob_all(batch)
        torch.testing.assert_close(lp.exp().sum(1), torch.ones(16, dtype=lp.dtype))
        (ref_v, ref_i), ref_rank = _brute(model, batch, 10)
        values, idx = model.topk(batch, 10)
        assert torch.equal(idx, ref_i)
        torch.testing.assert_close(values, ref_v)
        assert torch.equal(model.rank(batch), ref_rank)
        torch.testing.assert_close(model.log_prob(batch), lp.gather(1, batch["y"][:, None])[:, 0])


def test_user_memory_entries_reach_beyond_the_window():
    """A memory location outside the window gets history mass; without memory it gets none."""
    model = make("hsoftmax", "kmeans", "mixture", user_memory=6)
    batch = fake_batch(b=16, seed=1)
    hidden, window = model.hidden_and_window(batch)
    mem = model.memory.loc[batch["user"]]
    in_x = ((mem[:, :, None] == batch["x"][:, None, :]) & batch["mask"][:, None, :]).any(-1)
    outside = (mem > 0) & ~in_x
    assert bool(outside.any())
    assert bool(torch.isfinite(window.log_p_of(mem))[outside].all())


def test_user_memory_leaves_the_training_target_out():
    loc = torch.tensor([[0, 0], [5, 7]])
    count = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    memory = UserMemory(loc, count, d_model=4, emb_dim=3).double()
    embed = nn.Embedding(10, 3).double()
    user, hidden = torch.tensor([1, 1, 0]), torch.randn(3, 4, dtype=torch.float64)
    _, valid, logits = memory(user, hidden, embed)
    assert valid.tolist() == [[True, True], [True, True], [False, False]]
    _, valid_t, logits_t = memory(user, hidden, embed, target=torch.tensor([5, 7, 5]))
    # the target's own visit is not counted: 5 (seen once) drops out, 7 keeps 2 of its 3 visits
    assert valid_t.tolist() == [[False, True], [True, True], [False, False]]
    w = memory.w_count.detach()
    torch.testing.assert_close(logits_t[1, 1] - logits[1, 1], w * (math.log(2) - math.log(3)))


def test_context_id_of_samples_equals_the_batch_s():
    """The training tables' contexts (from the samples) and the model's (from a collate batch)
    agree, and both equal the definition in minutes: weekday of the target day, two-hour slot in
    which the last stay ends (taken at the middle of its 30-minute duration bucket)."""
    rng = np.random.default_rng(5)
    n = 40
    ends = np.cumsum(rng.integers(1, 5, n))
    stays = int(ends[-1])
    day = np.sort(rng.integers(0, 30, stays))
    samples = SampleSet(
        loc=rng.integers(2, 20, stays),
        user=np.repeat(rng.integers(1, 5, n), np.diff(ends, prepend=0)),
        weekday=rng.integers(0, 7, stays),
        start_min=rng.integers(0, 1440, stays),
        dur=rng.integers(0, 4000, stays),
        day=day,
        hist_start=np.append(0, ends[:-1]),
        hist_end=ends,
        target_day=day[ends - 1] + rng.integers(0, 8, n),
        y=rng.integers(2, 20, n),
    )
    got = sample_context(samples)
    ds = MobilityDataset(samples)
    batch_ctx = batch_context(collate([ds[i] for i in range(n)]))
    assert batch_ctx.tolist() == got.tolist()
    for i in range(n):
        last = ends[i] - 1
        wd = (samples.weekday[last] + samples.target_day[i] - day[last]) % 7
        bucket = min(samples.dur[last] // 30, 95)
        end = (samples.start_min[last] // 15) * 15 + bucket * 30 + 15
        assert got[i] == wd * 12 + (end % 1440) // 120, i


def test_user_memory_context_tables_against_counting():
    rng = np.random.default_rng(4)
    user, y, ctx = rng.integers(1, 6, 600), rng.integers(2, 30, 600), rng.integers(0, 84, 600)
    loc, _ = UserMemory.tables(user, y, n_users=7, size=5)
    table = UserMemory.context_tables(user, y, ctx, loc)
    assert table.shape == (7, 5, 7, 12)
    counts = Counter(zip(user.tolist(), y.tolist(), ctx.tolist(), strict=True))
    for u in range(7):
        for n in range(5):
            for c in range(84):
                expect = counts[(u, int(loc[u, n]), c)] if loc[u, n] > 0 else 0
                assert table[u, n, c // 12, c % 12] == expect, (u, n, c)
    with pytest.raises(ValueError, match=r"context must be ints in \[0, 84\)"):
        UserMemory.context_tables(user, y, ctx + 1, loc)


def test_user_memory_context_features_leave_the_training_target_out():
    loc = torch.tensor([[0, 0], [5, 7]])
    count = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
    ctx = torch.zeros(2, 2, 7, 12)
    ctx[1, 0, 2, 3] = 2.0  # location 5: twice on Wednesday, slot 3
    ctx[1, 1, 2, 4] = 3.0  # location 7: three times on Wednesday, slot 4
    torch.manual_seed(0)
    memory = UserMemory(loc, count, d_model=4, emb_dim=3, context_count=ctx).double()
    torch.manual_seed(0)
    plain_memory = UserMemory(loc, count, d_model=4, emb_dim=3).double()  # same weights
    embed = nn.Embedding(10, 3).double()
    user, hidden = torch.tensor([1, 1]), torch.randn(2, 4, dtype=torch.float64)
    context = torch.tensor([2 * 12 + 3, 2 * 12 + 3])  # both on Wednesday, slot 3
    with pytest.raises(ValueError, match="pass each example's context"):
        memory(user, hidden, embed)
    _, _, without = plain_memory(user, hidden, embed)
    _, _, logits = memory(user, hidden, embed, context=context)
    w = memory.w_context.detach()
    l1p = math.log1p
    # (in the context, on its weekday, in its slot): 5 -> (2, 2, 2); 7 -> (0, 3, 0)
    feats = torch.tensor([[l1p(2), l1p(2), l1p(2)], [0.0, l1p(3), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logits, without + (feats @ w)[None, :])
    _, _, trained = memory(user, hidden, embed, target=torch.tensor([5, 9]), context=context)
    # example 0's own visit to 5 leaves each of 5's counts one lower; example 1's target (9) is
    # not in the memory: its logits stay
    torch.testing.assert_close(trained[1], logits[1])
    torch.testing.assert_close(trained[0, 1], logits[0, 1])
    torch.testing.assert_close(
        trained[0, 0] - logits[0, 0],
        (l1p(1) - l1p(2)) * w.sum() + memory.w_count.detach() * (math.log(1) - math.log(2)),
    )


def test_user_memory_context_features_against_loops():
    """Each entry's (in the context, on its weekday, in its slot) counts, by plain loops over
    random tables, users and contexts."""
    g = torch.Generator().manual_seed(3)
    n_users, size = 4, 5
    ctx = torch.randint(0, 4, (n_users, size, 7, 12), generator=g).float()
    loc = torch.randint(0, 20, (n_users, size), generator=g)
    memory = UserMemory(loc, torch.ones(n_users, size), d_model=4, emb_dim=3, context_count=ctx)
    user = torch.randint(0, n_users, (9,), generator=g)
    context = torch.randint(0, 84, (9,), generator=g)
    got = memory._context_features(user, context, hit=None)
    want = torch.empty(9, size, 3)
    for b in range(9):
        day, slot = divmod(int(context[b]), 12)
        for n in range(size):
            table = ctx[user[b], n]
            want[b, n] = torch.stack([table[day, slot], table[day].sum(), table[:, slot].sum()])
    torch.testing.assert_close(got, torch.log1p(want))


def test_user_memory_needs_the_mixture():
    with pytest.raises(ValueError, match="user memory extends the pointer: it needs history 'mix"):
        make("dense", "kmeans", "none", user_memory=4)


def _next_stay_nll_by_hand(model, batch) -> torch.Tensor:
    """Mean over every (row b, position t) with a stay at t + 1 of the model's NLL of x[b, t + 1]
    given row b's window cut after position t, one cut window at a time."""
    terms = []
    for b in range(batch["x"].shape[0]):
        for t in range(int(batch["lengths"][b]) - 1):
            cut = {
                k: batch[k][b : b + 1, : t + 1]
                for k in ("x", "time", "weekday", "duration", "diff", "mask")
            }
            cut.update(
                lengths=torch.tensor([t + 1]),
                user=batch["user"][b : b + 1],
                y=batch["x"][b : b + 1, t + 1],
            )
            terms.append(-model.log_prob(cut)[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize(("head", "tree", "history"), VARIANTS)
def test_position_loss_is_the_nll_of_every_next_stay_from_its_prefix(head, tree, history):
    model = make(head, tree, history, position_loss=0.5)
    batch = fake_batch()
    ref = _next_stay_nll_by_hand(model, batch)
    torch.testing.assert_close(model.next_stay_nll(batch), ref)
    # forward = the main loss + weight * that loss; the main loss is the model's without it
    plain = make(head, tree, history)
    main = plain(batch, label_smoothing=0.05)
    torch.testing.assert_close(model(batch, label_smoothing=0.05), main + 0.5 * ref)
    # evaluation is untouched by the weight
    torch.testing.assert_close(model.log_prob(batch), plain.log_prob(batch))


def test_position_loss_is_causal_and_leaves_the_user_memory_out():
    model = make(position_loss=1.0, user_memory=4)
    batch = fake_batch()
    ref = model.next_stay_nll(batch)
    # the last stay's own features (not its location, a target) feed no earlier prediction
    changed = {k: v.clone() for k, v in batch.items()}
    last = batch["lengths"] - 1
    rows = torch.arange(len(last))
    changed["time"][rows, last] = 95
    changed["duration"][rows, last] = 1
    torch.testing.assert_close(model.next_stay_nll(changed), ref)
    ref.backward()
    assert model.encoder.input_proj.weight.grad.abs().amax() > 0
    assert model.output.gate.weight.grad.abs().amax() > 0
    assert all(p.grad is None for p in model.memory.parameters())


def test_position_loss_without_any_two_stay_window_is_zero():
    model = make(position_loss=1.0)
    batch = fake_batch(b=3, length=1)
    loss = model.next_stay_nll(batch)
    assert loss.item() == 0.0 and loss.requires_grad
    torch.testing.assert_close(model(batch), make()(batch))


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, True])
def test_position_loss_weight_is_checked(bad):
    with pytest.raises(ValueError, match="position_loss"):
        make(position_loss=bad)


def _window_brute(loc, valid, logits):
    """Per row in plain Python: p_hist(l) = sum of softmax(logits over valid positions) at l."""
    first = torch.zeros_like(valid)
    score = torch.zeros_like(logits)
    log_p = torch.full_like(logits, -math.inf)
    for b in range(loc.shape[0]):
        js = [j for j in range(loc.shape[1]) if valid[b, j]]
        if not js:
            continue
        log_z = torch.logsumexp(logits[b, js], 0)
        for j in js:
            same = [i for i in js if loc[b, i] == loc[b, j]]
            first[b, j] = same[0] == j
            score[b, j] = torch.logsumexp(logits[b, same], 0)
            log_p[b, j] = score[b, j] - log_z
    return first, score, log_p


def test_pointer_window_sums_each_location_against_brute_force():
    from hsoftmax.models.history import _window_from_position_logits

    g = torch.Generator().manual_seed(3)
    for vocab in (3, 8, 1000):  # many repeats .. none
        loc = torch.randint(0, vocab, (9, 13), generator=g)
        valid = torch.rand(9, 13, generator=g) < 0.7
        valid[0] = False  # a row without any entry
        valid[1] = True
        loc[2] = 5  # one location throughout
        logits = torch.randn(9, 13, dtype=torch.float64, generator=g).round(decimals=1)  # ties
        logits[3, :4] = -1e4  # far below the rest
        window = _window_from_position_logits(loc, valid, logits)
        first, score, log_p = _window_brute(loc, valid, logits)
        assert torch.equal(window.first, first)
        torch.testing.assert_close(window.score, score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(window.log_p, log_p, rtol=1e-12, atol=1e-12)
        x = logits.clone().requires_grad_()

        def score_and_log_p(t, loc=loc, valid=valid):
            w = _window_from_position_logits(loc, valid, t)
            return torch.where(valid, w.score, 0.0), torch.where(valid, w.log_p, 0.0)

        torch.autograd.gradcheck(score_and_log_p, (x,))
        out = _window_from_position_logits(loc, valid, x)
        torch.where(valid, out.log_p, 0.0).sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad[~valid] == 0).all()
