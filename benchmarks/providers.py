"""Output-layer providers timed by the benchmark suite, behind one interface.

Each provider owns its parameters and exposes ``loss(hidden, target)`` (mean NLL of the target).
Dimension letters: B batch, D hidden, V classes.

The plain-PyTorch reference hierarchical softmax comes from :mod:`hsoftmax.reference`, the same
code the unit tests use as an oracle.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from hsoftmax import Tree, reference
from hsoftmax.ops import path_log_prob


@functools.lru_cache(maxsize=4)
def balanced_tree(num_leaves: int, arity: int = 2) -> Tree:
    return Tree.balanced(num_leaves, arity)


class Dense(torch.nn.Module):
    """``nn.Linear`` + ``F.cross_entropy``: the baseline every figure is compared with."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, num_classes)

    def loss(self, hidden, target):
        return F.cross_entropy(self.linear(hidden), target)


class Adaptive(torch.nn.Module):
    """``nn.AdaptiveLogSoftmaxWithLoss`` with cutoffs at 5 % and 25 % of V (div_value 4)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        cutoffs = sorted({max(1, num_classes // 20), max(2, num_classes // 4)})
        cutoffs = [c for c in cutoffs if c < num_classes]
        self.head = torch.nn.AdaptiveLogSoftmaxWithLoss(dim, num_classes, cutoffs, div_value=4.0)

    def loss(self, hidden, target):
        return self.head(hidden, target).loss


class _TreeHead(torch.nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.tree = balanced_tree(num_classes)
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(num_classes - 1, dim, generator=g) / dim**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(num_classes - 1))


class ReferenceHS(_TreeHead):
    """Plain-PyTorch hierarchical softmax (gather the path rows + batched matmul)."""

    def loss(self, hidden, target):
        return -reference.path_log_prob(hidden, self.weight, self.bias, self.tree, target).mean()


class HSoftmax(_TreeHead):
    """The fused op on a balanced binary tree, dense weight gradient."""

    def loss(self, hidden, target):
        return -path_log_prob(hidden, self.weight, self.bias, self.tree, target).mean()


class HSoftmaxSparse(_TreeHead):
    """The fused op with ``sparse_grad=True``: only the rows the batch touched get a gradient
    (as word2vec / ``nn.Embedding(sparse=True)``); needs an optimizer that takes sparse grads."""

    def loss(self, hidden, target):
        return -path_log_prob(
            hidden, self.weight, self.bias, self.tree, target, sparse_grad=True
        ).mean()


PROVIDERS = {
    "dense": Dense,
    "adaptive": Adaptive,
    "reference_hs": ReferenceHS,
    "hsoftmax": HSoftmax,
    "hsoftmax_sparse": HSoftmaxSparse,
}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory_mb(step) -> float | None:
    """Extra resident memory (MB) at the peak of one call of ``step``, on CPU.

    Linux only: frees cached heap pages (malloc_trim), resets the high-water mark
    (/proc/self/clear_refs), and reads VmHWM - VmRSS around the call. None where unsupported.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - before) / 1024
    except (OSError, KeyError):
        return None


def cuda_peak_memory_mb(step) -> float:
    """Peak bytes held by torch's CUDA allocator during one call of ``step`` (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20
