"""Time-to-accuracy support in the trainer: interval evaluations, prior init, head learning rate,
warm-up and the users proxy, each against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsoftmax import trees
from hsoftmax.data import MobilityDataset, load_preset
from hsoftmax.models import build_model
from hsoftmax.nn import DenseSoftmax, HierarchicalSoftmax
from hsoftmax.training import evaluate_model, load_config, train
from hsoftmax.training.data import keep_users
from hsoftmax.training.loop import make_optimizer
from hsoftmax.tree import Tree

from conftest import QUIET, small_config

INTERVAL = ("train.batch_size=32", "train.max_steps_per_epoch=5", "train.val_metrics=true",
            "model.dropout=0.3", "train.label_smoothing=0.05")  # fmt: skip


def test_curve_points_at_fixed_sample_intervals_match_the_epoch_evaluation(cache_dir, tmp_path):
    cfg = small_config(
        cache_dir, tmp_path, "train.epochs=1", "train.eval_every_samples=64", *INTERVAL
    )
    result = train(cfg, **QUIET)
    curve = json.loads((result.run_dir / "curve.json").read_text())
    # 5 steps of 32: points before the first step and at 64 and 128 samples (steps 2 and 4)
    assert [p["samples"] for p in curve] == [0, 64, 128]
    assert [p["steps"] for p in curve] == [0, 2, 4]
    seconds = [p["train_seconds"] for p in curve]
    assert seconds[0] == 0.0 and seconds == sorted(seconds)
    # the point at 0 samples is the untrained model (same seed, same init) on all of validation
    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    torch.manual_seed(cfg["train"]["seed"])
    untrained = build_model(cfg["model"], data)
    ref = evaluate_model(untrained, MobilityDataset(data.validation), 512, "cpu", 0.05)
    assert curve[0]["val_nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert curve[0]["val_acc@1"] == pytest.approx(ref["metrics"]["acc@1"])
    assert result.history[0]["interval_eval_seconds"] > 0


def test_curve_on_a_validation_subset_and_across_a_resume(cache_dir, tmp_path):
    extra = ("train.eval_every_samples=96", "train.eval_samples=40", *INTERVAL)
    straight = train(small_config(cache_dir, tmp_path / "a", "train.epochs=2", *extra), **QUIET)
    first = train(small_config(cache_dir, tmp_path / "b", "train.epochs=1", *extra), **QUIET)
    resumed = train(resume=first.run_dir, overrides=["train.epochs=2"], **QUIET)

    a = json.loads((straight.run_dir / "curve.json").read_text())
    b = json.loads((resumed.run_dir / "curve.json").read_text())
    # 2 epochs x 160 samples: 0, 96, 192 (epoch 2's 2nd step), 288
    assert [p["samples"] for p in a] == [0, 96, 192, 288]
    assert [p["samples"] for p in b] == [p["samples"] for p in a]
    for p, q in zip(a, b, strict=True):
        assert p["val_nll"] == q["val_nll"] and p["val_acc@1"] == q["val_acc@1"]
    # 40 of the validation samples: an accuracy is a multiple of 1/40
    for p in a:
        assert p["val_acc@1"] * 40 / 100 == pytest.approx(round(p["val_acc@1"] * 40 / 100))


def _tree_leaf_log_prob(tree: Tree, weight, bias, hidden) -> torch.Tensor:
    """Brute force: walk each leaf's path, a softmax over [0, z_1 .. z_{c-1}] per node."""
    v = tree.num_leaves
    parents = tree.parents.tolist()
    out = torch.zeros(hidden.shape[0], v, dtype=torch.float64)
    row = 0
    rows = {}
    for node in range(v, tree.num_nodes):
        rows[node] = row
        row += len(tree.children(node)) - 1
    for leaf in range(v):
        child = leaf
        while parents[child] >= 0:
            node = parents[child]
            kids = tree.children(node)
            r = rows[node]
            z = torch.cat(
                [torch.zeros(hidden.shape[0], 1, dtype=torch.float64),
                 hidden @ weight[r : r + len(kids) - 1].T + bias[r : r + len(kids) - 1]], 1
            )  # fmt: skip
            out[:, leaf] += z.log_softmax(1)[:, kids.index(child)]
            child = node
    return out


@pytest.mark.parametrize(
    "make_tree",
    [
        lambda v, rng: Tree.balanced(v, 2),
        lambda v, rng: Tree.balanced(v, 3),
        lambda v, rng: trees.huffman(rng.integers(0, 50, v), 2),
        lambda v, rng: trees.from_features(rng.normal(size=(v, 2)), branching=(4,), seed=0),
    ],
    ids=["binary", "ternary", "huffman", "kmeans"],
)
@pytest.mark.parametrize("v", [2, 7, 61])
def test_prior_init_gives_the_unigram_log_frequencies(make_tree, v):
    rng = np.random.default_rng(v)
    counts = rng.integers(0, 40, v)
    counts[0] = 0  # a class never seen: kept finite by the pseudocount
    expected = np.log((counts + 0.1) / (counts + 0.1).sum())
    tree = make_tree(v, rng)
    hidden = torch.randn(5, 6, dtype=torch.float64)
    for head in (HierarchicalSoftmax(6, tree, dtype=torch.float64), DenseSoftmax(6, v)):
        head = head.double()
        head.init_prior(counts)
        with torch.no_grad():
            head.weight.zero_()
        got = head.log_prob_all(hidden)
        assert torch.allclose(got, torch.from_numpy(expected).expand(5, v), atol=1e-10)
        if isinstance(head, HierarchicalSoftmax):  # and a brute-force walk of the paths
            brute = _tree_leaf_log_prob(tree, head.weight, head.bias, hidden)
            assert torch.allclose(brute, got, atol=1e-10)


def test_prior_init_bad_input():
    head = DenseSoftmax(4, 5)
    with pytest.raises(ValueError, match="counts must have V = 5 entries, got 4"):
        head.init_prior([1, 2, 3, 4])
    with pytest.raises(ValueError, match="counts must be finite and >= 0"):
        head.init_prior([1, 2, -3, 4, 5])
    with pytest.raises(ValueError, match="pseudocount must be > 0, got 0"):
        head.init_prior([1, 2, 3, 4, 5], pseudocount=0)
    with pytest.raises(ValueError, match="needs a head with a bias"):
        DenseSoftmax(4, 5, bias=False).init_prior([1, 2, 3, 4, 5])


def test_model_prior_init_uses_the_training_targets(cache_dir, tmp_path):
    cfg = small_config(cache_dir, tmp_path, "model.prior_init=true", "model.history=none")
    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    model = build_model(cfg["model"], data)
    head = model.output.head
    with torch.no_grad():
        head.weight.zero_()
    counts = np.bincount(data.train.y, minlength=data.n_locations) + 0.1
    lp = head.log_prob_all(torch.zeros(1, head.in_features))[0].double()
    assert torch.allclose(lp, torch.from_numpy(np.log(counts / counts.sum())), atol=1e-5)


def test_head_lr_mult_and_warmup(cache_dir, tmp_path):
    cfg = small_config(cache_dir, tmp_path, "train.head_lr_mult=4", "train.lr=0.01")
    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    model = build_model(cfg["model"], data)
    opt = make_optimizer(model, cfg["train"])
    head_ids = {id(p) for p in model.output.head.parameters()}
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lrs) == len(list(model.parameters()))
    for pid, lr in lrs.items():
        assert lr == pytest.approx(0.04 if pid in head_ids else 0.01)
    # warm-up: after step k (of 4 warm-up steps) the recorded lr is lr * k / 4, then lr
    res = train(
        small_config(
            cache_dir, tmp_path, "train.epochs=2", "train.max_steps_per_epoch=3",
            "train.warmup_steps=4", "train.lr=0.01", "train.val_metrics=false",
        ),
        **QUIET,
    )  # fmt: skip
    assert res.history[0]["lr"] == pytest.approx(0.01 * 3 / 4)
    assert res.history[1]["lr"] == pytest.approx(0.01)


def test_keep_users_keeps_only_their_samples(cache_dir):
    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    cut = keep_users(data, 7)
    for name, s in data.splits.items():
        mine = s.sample_user <= 7
        t = cut.splits[name]
        assert len(t) == int(mine.sum()) > 0
        np.testing.assert_array_equal(t.y, s.y[mine])
        np.testing.assert_array_equal(t.lengths, s.lengths[mine])
        assert [t[i]["X"].tolist() for i in range(3)] == [
            s[j]["X"].tolist() for j in np.flatnonzero(mine)[:3]
        ]
    assert cut.n_locations == data.n_locations
    cfg = load_config(None, ["data.users=7"])
    assert cfg["data"]["users"] == 7
