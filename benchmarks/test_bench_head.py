"""Exact top-k and rank of the hierarchical-softmax head against a dense ``Linear`` head.

Run: ``PYTHONPATH=. pytest benchmarks/test_bench_head.py --benchmark-only`` (about 40 s on a
quiet machine, up to 150 s when the cores are shared).

Setting (the issue's): V = 15,584 classes, D = 112, B = 1,024 queries, 2 threads, float32, a
balanced binary tree. Baselines: ``torch.topk(F.linear(h, W, b), 10)`` and, for rank,
``(logits > logits.gather(1, y[:, None])).sum(1) + 1`` - their cost does not depend on the
weights. The tree search's cost does, so the HS head is timed with three sets of weights:

* ``teacher``: random weights scaled by 8 (row norm ~8): a peaked distribution built directly
  (mean entropy ~2.2 nats, mean top-1 probability ~0.4). Queries' targets are sampled from it.
* ``student``: a fresh head trained for ``STUDENT_STEPS`` Adam steps on (h, y) pairs sampled from
  the teacher - what a briefly trained head looks like.
* ``random``: the untrained initialisation (``nn.Linear``'s), the worst case: a nearly flat
  distribution, so few subtrees can be pruned. Targets are uniform.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hsoftmax import HierarchicalSoftmax, Tree

V, D, B, K = 15_584, 112, 1_024, 10
THREADS = 2
TEACHER_SCALE = 8.0
STUDENT_STEPS = 300
ROUNDS = 10


def sample_from(head: HierarchicalSoftmax, hidden: torch.Tensor, generator) -> torch.Tensor:
    """Ancestral sampling down the tree: one child choice per level, vectorised over the batch."""
    tree = head.tree
    child_ptr, children = tree.child_ptr, tree.children_flat
    counts = child_ptr[1:] - child_ptr[:-1]
    row_ptr = child_ptr[:-1] - torch.arange(counts.numel())
    width = int(counts.max())
    node = torch.full((hidden.shape[0],), int((tree.parents == -1).nonzero()[0, 0]))
    v = tree.num_leaves
    with torch.no_grad():
        while bool((node >= v).any()):
            active = (node >= v).nonzero()[:, 0]
            i = node[active] - v
            k = torch.arange(1, width)
            rows = row_ptr[i, None] + k - 1
            valid = k < counts[i, None]
            rows = torch.where(valid, rows, 0)
            z = torch.einsum("bd,bkd->bk", hidden[active], head.weight[rows]) + head.bias[rows]
            z = torch.cat([torch.zeros_like(z[:, :1]), z.masked_fill(~valid, float("-inf"))], 1)
            choice = torch.multinomial(z.softmax(1), 1, generator=generator)[:, 0]
            node[active] = children[child_ptr[i] + choice]
    return node


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tree = Tree.balanced(V, 2)
    teacher = HierarchicalSoftmax(D, tree)
    with torch.no_grad():
        teacher.weight.normal_(0.0, TEACHER_SCALE / D**0.5, generator=g)
        teacher.bias.zero_()
    student = HierarchicalSoftmax(D, tree)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(STUDENT_STEPS):
        h = torch.randn(B, D, generator=g)
        loss = student(h, sample_from(teacher, h, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    random_head = HierarchicalSoftmax(D, tree)
    hidden = torch.randn(B, D, generator=g)
    targets = sample_from(teacher, hidden, g)
    dense = torch.nn.Linear(D, V)
    heads = {"teacher": teacher, "student": student, "random": random_head}
    peakedness = {}
    with torch.no_grad():
        for name, head in heads.items():
            lp = head.log_prob_all(hidden[:256])
            peakedness[name] = {
                "entropy_nats": round(float(-(lp.exp() * lp).sum(1).mean()), 3),
                "top1_prob": round(float(lp.max(1).values.exp().mean()), 4),
            }
    return {
        "peakedness": peakedness,
        "hidden": hidden,
        "heads": heads,
        "targets": {
            "teacher": targets,
            "student": targets,
            "random": torch.randint(0, V, (B,), generator=g),
        },
        "dense": (dense.weight.detach(), dense.bias.detach()),
    }


def run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def dense_rank(benchmark, weight, bias, hidden, target):
    """Times the dense baseline of ``rank``: all logits, then a comparison count."""

    def rank():
        logits = F.linear(hidden, weight, bias)
        return (logits > logits.gather(1, target[:, None])).sum(1) + 1

    with torch.no_grad():
        run(benchmark, rank)


@pytest.mark.benchmark(group="topk")
def test_topk_dense(benchmark, setting):
    weight, bias = setting["dense"]
    hidden = setting["hidden"]
    with torch.no_grad():
        run(benchmark, lambda: torch.topk(F.linear(hidden, weight, bias), K, dim=1))


@pytest.mark.benchmark(group="topk")
@pytest.mark.parametrize("weights", ["teacher", "student", "random"])
def test_topk_hs(benchmark, setting, weights):
    head, hidden = setting["heads"][weights], setting["hidden"]
    values, indices = run(benchmark, lambda: head.topk(hidden, K))
    benchmark.extra_info.update(setting["peakedness"][weights])
    assert indices.shape == (B, K)


@pytest.mark.benchmark(group="rank")
def test_rank_dense(benchmark, setting):
    weight, bias = setting["dense"]
    dense_rank(benchmark, weight, bias, setting["hidden"], setting["targets"]["random"])


@pytest.mark.benchmark(group="rank")
@pytest.mark.parametrize("weights", ["teacher", "student", "random"])
def test_rank_hs(benchmark, setting, weights):
    head, hidden, target = setting["heads"][weights], setting["hidden"], setting["targets"][weights]
    rank = run(benchmark, lambda: head.rank(hidden, target))
    benchmark.extra_info.update(setting["peakedness"][weights])
    benchmark.extra_info["median_rank"] = float(rank.float().median())
    assert rank.shape == (B,)


# ------------------------------------------------------------------ every class's log-prob


@pytest.fixture(scope="module")
def all_classes_inputs():
    """Untrained weights: scoring every class costs the same whatever the weights."""
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    heads = {a: HierarchicalSoftmax(D, Tree.balanced(V, a)) for a in (2, 128)}
    return heads, torch.randn(B, D, generator=g), torch.nn.Linear(D, V)


@pytest.mark.benchmark(group="all-classes")
def test_all_classes_dense(benchmark, all_classes_inputs):
    _, hidden, dense = all_classes_inputs
    with torch.no_grad():
        out = run(benchmark, lambda: F.log_softmax(dense(hidden), dim=1))
    assert out.shape == (B, V)


@pytest.mark.benchmark(group="all-classes")
@pytest.mark.parametrize("arity", [2, 128])
@pytest.mark.parametrize("method", ["ranking_log_prob_all", "log_prob_all"])
def test_all_classes_hs(benchmark, all_classes_inputs, arity, method):
    """``ranking_log_prob_all``: the C++ scorer with the searches' bits (what the history
    mixture's exact rank falls back to); ``log_prob_all``: the differentiable PyTorch one."""
    heads, hidden, _ = all_classes_inputs
    fn = getattr(heads[arity], method)
    with torch.no_grad():
        out = run(benchmark, lambda: fn(hidden))
    assert out.shape == (B, V)


# ------------------------------------------------------------------ label-smoothed training loss


@pytest.fixture(scope="module")
def smoothing_inputs():
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, D, generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    return hidden, target


def _fwd_bwd(loss_fn, hidden, params):
    def step():
        h = hidden.detach().requires_grad_()
        loss = loss_fn(h)
        grads = torch.autograd.grad(loss, [h, *params])
        return loss.detach(), grads

    return step


@pytest.mark.benchmark(group="smoothed-loss")
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_smoothed_loss_dense(benchmark, smoothing_inputs, eps):
    """fwd + bwd of ``F.cross_entropy(linear(h), y, label_smoothing=eps)`` (the dense baseline)."""
    hidden, target = smoothing_inputs
    dense = torch.nn.Linear(D, V)
    params = list(dense.parameters())
    fn = _fwd_bwd(lambda h: F.cross_entropy(dense(h), target, label_smoothing=eps), hidden, params)
    loss, _ = run(benchmark, fn)
    assert torch.isfinite(loss)


@pytest.mark.benchmark(group="smoothed-loss")
@pytest.mark.parametrize("arity", [2, 128])
@pytest.mark.parametrize(
    "eps,smoothing",
    [(0.0, "leaves"), (0.05, "leaves"), (0.05, "nodes")],
    ids=["0", "leaves", "nodes"],
)
def test_smoothed_loss_hs(benchmark, smoothing_inputs, arity, eps, smoothing):
    """fwd + bwd of the tree head's loss; eps > 0 with ``"leaves"`` adds the exact mean over all
    V leaves, with ``"nodes"`` the mean over each path node's children."""
    hidden, target = smoothing_inputs
    head = HierarchicalSoftmax(D, Tree.balanced(V, arity))
    params = list(head.parameters())

    def loss_fn(h):
        return head(h, target, label_smoothing=eps, smoothing=smoothing)

    loss, _ = run(benchmark, _fwd_bwd(loss_fn, hidden, params))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ a head trained by the trainer
# HSOFTMAX_BENCH_RUN=experiments/results/diy/runs/hs-binary-seed0 PYTHONPATH=. \
#     pytest benchmarks/test_bench_head.py -k trained --benchmark-only
# times the head of a real run on its own test hidden states (skipped when the variable is not
# set).

TRAINED_RUN = os.environ.get("HSOFTMAX_BENCH_RUN")  # a run directory of `hsoftmax train`


@pytest.fixture(scope="module")
def trained():
    """The tree head of a real training run (its best checkpoint) and B hidden states of the
    run's test samples: set ``HSOFTMAX_BENCH_RUN=<run dir>`` (a run with ``model.head=hsoftmax``,
    e.g. one of ``experiments/compare_heads.py``'s)."""
    if not TRAINED_RUN:
        pytest.skip("set HSOFTMAX_BENCH_RUN=<run directory of a tree-head training> to time it")
    from hsoftmax.data import MobilityDataset, collate
    from hsoftmax.models import build_model
    from hsoftmax.training import load_checkpoint, load_config, load_data

    torch.set_num_threads(THREADS)
    run = Path(TRAINED_RUN)
    cfg = load_config(run / "config.yaml")
    if cfg["model"]["head"] != "hsoftmax":
        pytest.skip(f"{run} trained a {cfg['model']['head']} head, not a tree")
    ckpt = load_checkpoint(run / "ckpt.pt")
    data = load_data(cfg["data"], progress=False)
    model = build_model(cfg["model"], data)
    model.load_state_dict(ckpt["best_model"] or ckpt["model"])
    model.eval()
    test = MobilityDataset(data.test, max_len=cfg["data"]["max_len"])
    batch = collate([test[i] for i in range(min(B, len(test)))])
    with torch.no_grad():
        hidden = model.hidden_and_window(batch)[0].contiguous()
        head = model.head
        lp = head.log_prob_all(hidden[:256])
    info = {
        "run": str(run),
        "epochs_trained": ckpt["epoch"],
        "tree": cfg["model"]["tree"],
        "entropy_nats": round(float(-(lp.exp() * lp).sum(1).mean()), 3),
        "top1_prob": round(float(lp.max(1).values.exp().mean()), 4),
    }
    dense = torch.nn.Linear(hidden.shape[1], head.num_classes)
    return {"head": head, "hidden": hidden, "target": batch["y"], "info": info, "dense": dense}


@pytest.mark.benchmark(group="topk-trained")
def test_topk_trained_dense(benchmark, trained):
    weight, bias, hidden = trained["dense"].weight, trained["dense"].bias, trained["hidden"]
    with torch.no_grad():
        run(benchmark, lambda: torch.topk(F.linear(hidden, weight, bias), K, dim=1))


@pytest.mark.benchmark(group="topk-trained")
def test_topk_trained_hs(benchmark, trained):
    head, hidden = trained["head"], trained["hidden"]
    values, indices = run(benchmark, lambda: head.topk(hidden, K))
    benchmark.extra_info.update(trained["info"])
    assert indices.shape == (hidden.shape[0], K)


@pytest.mark.benchmark(group="rank-trained")
def test_rank_trained_dense(benchmark, trained):
    dense = trained["dense"]
    dense_rank(benchmark, dense.weight, dense.bias, trained["hidden"], trained["target"])


@pytest.mark.benchmark(group="rank-trained")
def test_rank_trained_hs(benchmark, trained):
    head, hidden, target = trained["head"], trained["hidden"], trained["target"]
    rank = run(benchmark, lambda: head.rank(hidden, target))
    benchmark.extra_info.update(trained["info"])
    benchmark.extra_info["median_rank"] = float(rank.float().median())
