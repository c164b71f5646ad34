"""The probability-level ensemble: exact top-k and ranks against a float64 brute force, and
``hsoftmax evaluate RUN RUN`` on two tiny trained runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hsoftmax.models import Ensemble


class FixedModel(nn.Module):
    """A member whose log-probabilities are a fixed (B, V) table (rows sum to 1 in prob space)."""

    def __init__(self, log_p: torch.Tensor):
        super().__init__()
        self.register_buffer("table", log_p)

    @property
    def num_classes(self) -> int:
        return self.table.shape[1]

    def log_prob_all(self, batch):
        return self.table[batch["rows"]]


def _members(seed: int, m: int, b: int, v: int):
    g = torch.Generator().manual_seed(seed)
    return [FixedModel(torch.randn(b, v, generator=g).log_softmax(1)) for _ in range(m)]


def _reference(members, y):
    """Mean probability in float64, order by value then id, rank of y: plain NumPy."""
    p = np.mean([m.table.double().exp().numpy() for m in members], axis=0)
    order = [sorted(range(p.shape[1]), key=lambda c, r=r: (-p[r, c], c)) for r in range(len(p))]
    ranks = [order[r].index(int(t)) + 1 for r, t in enumerate(y)]
    return p, np.array(order), np.array(ranks)


@pytest.mark.parametrize("m", [2, 3])
def test_ensemble_matches_brute_force(m):
    b, v = 6, 40
    members = _members(m, m, b, v)
    y = torch.tensor([0, 5, 39, 7, 7, 20])
    batch = {"rows": torch.arange(b), "y": y}
    ens = Ensemble(members)
    p, order, ranks = _reference(members, y)
    np.testing.assert_allclose(ens.log_prob_all(batch).exp().double().numpy(), p, rtol=1e-5)
    values, top = ens.topk(batch, 10)
    assert top.tolist() == order[:, :10].tolist()
    assert ens.rank(batch).tolist() == ranks.tolist()
    loss, nll, top_eval, rank_eval = ens.evaluate_batch(batch, 10, label_smoothing=0.1)
    assert torch.equal(top_eval, top) and rank_eval.tolist() == ranks.tolist()
    lp = np.log(p)
    expect_nll = -lp[np.arange(b), y.numpy()].sum()
    assert float(nll) == pytest.approx(expect_nll, rel=1e-5)
    expect_loss = (0.9 * -lp[np.arange(b), y.numpy()] - 0.1 * lp.mean(1)).sum()
    assert float(loss) == pytest.approx(expect_loss, rel=1e-5)


def test_ensemble_ties_go_to_the_lower_id():
    # two members that swap classes 1 and 2: the mean ties them; rank and top-k agree on 1 first
    a = torch.tensor([[0.1, 0.5, 0.3, 0.1]]).log()
    b = torch.tensor([[0.1, 0.3, 0.5, 0.1]]).log()
    ens = Ensemble([FixedModel(a), FixedModel(b)])
    batch = {"rows": torch.tensor([0]), "y": torch.tensor([2])}
    assert ens.topk(batch, 4)[1].tolist() == [[1, 2, 0, 3]]
    assert ens.rank(batch).tolist() == [2]


def test_ensemble_checks_its_members():
    with pytest.raises(ValueError, match="at least 2 models"):
        Ensemble(_members(0, 1, 2, 5))
    with pytest.raises(ValueError, match=r"share their classes, got num_classes \[5, 6\]"):
        Ensemble(_members(0, 1, 2, 5) + _members(1, 1, 2, 6))


def test_evaluate_two_runs_as_an_ensemble(tmp_path, capsys):
    """Two tiny runs (seeds 0 and 1) -> ``hsoftmax evaluate RUN RUN``: the ensemble's metrics
    equal the brute-force mean of the two loaded models' probabilities."""
    from hsoftmax.cli import main
    from hsoftmax.data import MobilityDataset, collate, load_preset
    from hsoftmax.metrics import metrics_from_ranks
    from hsoftmax.training import load_config, load_run, train

    cache = tmp_path / "cache"
    runs = []
    for seed in (0, 1):
        cfg = load_config(
            None,
            [
                "data.preset=small", f"data.cache_dir={cache}", f"name=s{seed}",
                f"output.dir={tmp_path / 'runs'}",
                f"train.seed={seed}", "train.epochs=1", "train.max_steps_per_epoch=3",
                "train.val_metrics=false", "train.progress=false", "model.d_model=16",
                "model.nhead=2", "model.num_layers=1", "model.dim_feedforward=16",
                "model.tree=balanced", "train.num_threads=1",
            ],
        )  # fmt: skip
        runs.append(train(cfg, echo=lambda *a, **k: None).run_dir)
    out = tmp_path / "ens.json"
    argv = ["evaluate", *map(str, runs), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "ensemble of 2" in capsys.readouterr().out
    got = json.loads(out.read_text())
    cfg = load_config(runs[0] / "config.yaml")
    data = load_preset(cfg["data"]["preset"], seed=cfg["data"]["seed"], cache_dir=cache)
    models = [load_run(r, data=data) for r in runs]
    assert got["parameters"] == sum(p.numel() for m in models for p in m.parameters())
    test = MobilityDataset(data.test, max_len=cfg["data"]["max_len"])
    batch = collate([test[i] for i in range(len(test))])
    with torch.no_grad():
        p = torch.stack([m.log_prob_all(batch).double().exp() for m in models]).mean(0)
    mine = p.gather(1, batch["y"][:, None])
    # ranks by value, ties by lower id (float64 reference: ties are not expected here)
    ranks = (p > mine).sum(1) + 1
    ref = metrics_from_ranks(ranks, p.argmax(1), batch["y"])
    assert got["n"] == len(test)
    for key in ("acc@1", "acc@5", "acc@10", "mrr"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
