"""Forward+backward of one output-layer loss: hsoftmax vs dense softmax and its peers.

Issue-2 configuration: V = 15,584 (DIY), D = 112, B = 1,024, float32, 2 threads, balanced
binary tree. Each timed call does forward, backward, and resets the gradients (as
``optimizer.zero_grad(set_to_none=True)`` would), so no provider pays for gradient accumulation.

    pytest benchmarks/test_bench_op.py --benchmark-only --benchmark-json=bench_op.json
    python benchmarks/report.py bench_op.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsoftmax import Tree, reference
from hsoftmax.ops import path_log_prob

V, D, B = 15_584, 112, 1_024


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, D, generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    return hidden, target


def _run(loss_fn, params):
    def step():
        for p in params:
            p.grad = None
        loss_fn().backward()

    return step


def make_dense(hidden, target):
    linear = torch.nn.Linear(D, V)
    h = hidden.clone().requires_grad_()
    return _run(lambda: F.cross_entropy(linear(h), target), [h, *linear.parameters()])


def make_adaptive(hidden, target):
    # cutoffs at ~1/20 and ~1/4 of V, as recommended for Zipf-like vocabularies
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(D, V, cutoffs=[V // 20, V // 4], div_value=4.0)
    h = hidden.clone().requires_grad_()
    return _run(lambda: head(h, target).loss, [h, *head.parameters()])


def _hs_params():
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(V - 1, D, generator=g) / D**0.5).requires_grad_()
    bias = torch.zeros(V - 1, requires_grad=True)
    return weight, bias


def make_reference_hs(hidden, target):
    tree = Tree.balanced(V, 2)
    weight, bias = _hs_params()
    h = hidden.clone().requires_grad_()
    return _run(
        lambda: -reference.path_log_prob(h, weight, bias, tree, target).mean(), [h, weight, bias]
    )


def make_hsoftmax(hidden, target):
    tree = Tree.balanced(V, 2)
    weight, bias = _hs_params()
    h = hidden.clone().requires_grad_()
    return _run(lambda: -path_log_prob(h, weight, bias, tree, target).mean(), [h, weight, bias])


PROVIDERS = {
    "dense": make_dense,
    "adaptive": make_adaptive,
    "reference_hs": make_reference_hs,
    "hsoftmax": make_hsoftmax,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fwd_bwd(benchmark, data, provider):
    benchmark.group = f"fwd+bwd V={V} D={D} B={B}"
    benchmark.extra_info.update(
        provider=provider, V=V, D=D, B=B, mode="fwd+bwd", threads=torch.get_num_threads()
    )
    step = PROVIDERS[provider](*data)
    step()  # warm-up outside the timing
    rounds = 5 if provider == "dense" else 50
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
