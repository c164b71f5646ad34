"""One training step of an input embedding + hierarchical-softmax head across vocabulary sizes:
dense gradients + ``torch.optim.AdamW`` against row-sparse gradients + ``SparseAdamW``.

Run: ``PYTHONPATH=. pytest benchmarks/test_bench_sparse_step.py --benchmark-only`` (about 2 min;
``--quick``: V = 15,584 and 1,000,000 with the 128-ary tree only). On shared cores, time CPU
instead of wall clock: ``OMP_WAIT_POLICY=PASSIVE ... --benchmark-timer=time.process_time`` (the
table in docs/sparse.md).

Setting (issue 24's): V in {15,584, 100,000, 1,000,000} locations; an ``nn.Embedding(V, 48)``
over input ids, ``Linear(48, 112)`` and tanh give the hidden state (D = 112) of a batch of
B = 256; the head is a ``HierarchicalSoftmax(112, Tree.balanced(V, arity))``, binary or 128-ary.
Ids and targets are uniform over V: the most rows a batch can touch, so the sparse figures are
an upper bound for real (skewed) data. A step is zero_grad, forward, backward, optimizer step:

* ``dense``: dense embedding and head gradients (O(V * D) each) and ``torch.optim.AdamW``, which
  reads and writes every row of the weights and of both moments.
* ``sparse``: ``nn.Embedding(sparse=True)`` and ``path_log_prob(..., sparse_grad=True)``: the
  gradients hold only the touched rows, and ``SparseAdamW`` updates only those.

The head is called through ``hsoftmax.ops.path_log_prob`` because ``HierarchicalSoftmax`` does
not yet expose ``sparse_grad``. ``extra_info`` holds the memory of one extra, untimed step:
``peak_rss_step_mb`` (the process's peak resident memory during that step, the kernel's
high-water mark reset just before it; Linux only), ``rss_before_step_mb``, ``tensor_mb`` (weights
+ gradients + optimizer state, summed over the tensors after the backward) and
``touched_head_rows`` (rows of the head's gradient); ``step_extra_rss_mb`` is the peak minus the
resident memory before the step: what the step itself allocates beyond what persists.
"""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from torch import nn

from hsoftmax import HierarchicalSoftmax, Tree
from hsoftmax.ops import path_log_prob
from hsoftmax.optim import SparseAdamW

VOCABS = (15_584, 100_000, 1_000_000)
ARITIES = (2, 128)
EMB, D, B = 48, 112, 256
ROUNDS = {"dense": 5, "sparse": 20}  # sparse steps are cheap: more rounds steady the median
QUICK = {(15_584, 128), (1_000_000, 128)}


class Model(nn.Module):
    """Embedding -> Linear -> tanh -> hierarchical softmax; ``sparse`` picks the gradient kind."""

    def __init__(self, tree: Tree, sparse: bool):
        super().__init__()
        self.sparse = sparse
        self.embedding = nn.Embedding(tree.num_leaves, EMB, sparse=sparse)
        self.proj = nn.Linear(EMB, D)
        self.head = HierarchicalSoftmax(D, tree)

    def forward(self, ids, target):
        hidden = torch.tanh(self.proj(self.embedding(ids)))
        head = self.head
        log_prob = path_log_prob(
            hidden, head.weight, head.bias, head.tree, target, sparse_grad=self.sparse
        )
        return -log_prob.mean()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.is_sparse:
        return _tensor_bytes(t._indices()) + _tensor_bytes(t._values())
    return t.numel() * t.element_size()


def _memory_of_one_step(model, optimizer, step_fn) -> dict:
    """Peak RSS of one step (high-water mark reset first) and the tensors a step keeps alive."""
    info = {}
    if sys.platform.startswith("linux"):
        rss_before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        step_fn()
        info["rss_before_step_mb"] = round(rss_before / 1024, 1)
        info["peak_rss_step_mb"] = round(_status_kb("VmHWM") / 1024, 1)
        info["step_extra_rss_mb"] = round((_status_kb("VmHWM") - rss_before) / 1024, 1)
    else:
        step_fn()
        info["peak_rss_process_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    info["tensor_mb"] = round(sum(_tensor_bytes(t) for t in tensors) / 2**20, 1)
    grad = model.head.weight.grad
    info["touched_head_rows"] = int(grad._nnz()) if grad.is_sparse else grad.shape[0]
    return info


_TREES: dict = {}


def _tree(vocab, arity):
    if (vocab, arity) not in _TREES:
        _TREES.clear()  # one tree at a time: the 1M trees are large
        _TREES[(vocab, arity)] = Tree.balanced(vocab, arity)
    return _TREES[(vocab, arity)]


@pytest.mark.benchmark(group="sparse-step")
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize(
    ("vocab", "arity"),
    [
        pytest.param(v, a, marks=[pytest.mark.quick] if (v, a) in QUICK else [], id=f"V{v}-{a}ary")
        for a in ARITIES
        for v in VOCABS
    ],
)
def test_sparse_step(benchmark, vocab, arity, mode):
    tree = _tree(vocab, arity)
    torch.manual_seed(0)
    model = Model(tree, sparse=mode == "sparse")
    if mode == "sparse":
        optimizer = SparseAdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, vocab, (B,), generator=g), torch.randint(0, vocab, (B,), generator=g))
        for _ in range(4)
    ]
    counter = iter(range(10**9))

    def step():
        ids, target = batches[next(counter) % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, target)
        loss.backward()
        optimizer.step()
        return loss.detach()  # the gradients stay until the next step's zero_grad

    loss = benchmark.pedantic(step, rounds=ROUNDS[mode], iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        vocab=vocab,
        arity=arity,
        depth=tree.depth,
        max_path_rows=tree.max_path_rows,
        **_memory_of_one_step(model, optimizer, step),
    )
    assert torch.isfinite(loss)
