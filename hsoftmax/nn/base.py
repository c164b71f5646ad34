"""Output heads: :class:`HierarchicalSoftmax` and its dense twin :class:`DenseSoftmax`.

Dimension letters: B batch, D ``in_features``, V leaves (classes), M internal nodes, E = N - 1
tree edges (one per non-root node).

Both heads have one interface, so a model switches heads with one argument:

* ``head(hidden, target, reduction=, ignore_index=, label_smoothing=)``: negative log-likelihood,
  the same contract as ``F.cross_entropy(linear(hidden), target, ...)``.
* ``head.log_prob(hidden, target)`` (B,), ``head.log_prob_all(hidden)`` (B, V),
  ``head.log_prob_and_mean(hidden, ids)``: (B, K) log-probs of ``ids`` and (B,) mean over all V.
* ``head.nll_and_smoothing(hidden, target, smoothing)``: the two terms of a smoothed loss.
* ``head.topk(hidden, k)`` and ``head.rank(hidden, target)``: exact, with one tie rule.

**Tie rule.** Leaves are ordered by log-probability descending, then by leaf id ascending. ``topk``
returns the first k leaves of that order and ``rank`` the 1-based position of the target in it:
``rank(y) = 1 + #{l : lp(l) > lp(y)} + #{l : lp(l) == lp(y), l < y}``, so
``topk(h, V).indices[b, rank[b] - 1] == target[b]``. "Equal" means bit-equal as computed by the
head (the tree search accumulates each leaf's log-prob root-down in float32, or float64 for
float64 inputs; NaN log-probs rank as -inf).

**k > V** is clamped: ``topk`` returns ``min(k, V)`` columns (so ``topk(h, 10)`` works on any
vocabulary, e.g. for accuracy@10), and ``k < 1`` raises.

**Label smoothing** (``label_smoothing = eps``) mixes the target with the uniform distribution
over the V leaves, exactly as ``F.cross_entropy(..., label_smoothing=eps)`` does for a dense head:
``loss = (1 - eps) * (-log p(y)) + eps * mean_l(-log p(l))``. For a tree the mean is exact and
needs no leaf log-probabilities: ``sum_l log p(l) = sum over edges (n -> c) of leaves(c) *
log p(c | n)``, one term per edge, from the (B, V - 1) node logits (one matmul, one log-sum-exp
per node, two matrix-vector products). It still scores all ``V - 1`` rows per example
(O(V * D)), so a smoothed loss costs about as much as a dense head's: the price of exact
smoothing. ``log_prob_and_mean`` gives the same mean together with the log-probs of K classes
per row, gathered from the same logits (what a smoothed mixture with another distribution needs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "SMOOTHING_MODES",
    "Head",
    "check_k",
    "check_label_smoothing",
    "check_reduction",
    "check_smoothing_mode",
    "rank_by_id",
    "topk_by_id",
]

# what a head's loss can reduce to, and where label smoothing spreads its mass
_REDUCTIONS = ("mean", "sum", "none")
SMOOTHING_MODES = ("leaves", "nodes")


def check_smoothing_mode(smoothing) -> None:
    """Raises ValueError unless ``smoothing`` is one of :data:`SMOOTHING_MODES`."""
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be 'leaves' or 'nodes', got {smoothing!r}")


def check_reduction(reduction) -> None:
    """Raises ValueError unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing) -> None:
    """Raises unless ``label_smoothing`` is a float in [0, 1]."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_k(k) -> None:
    """Raises unless ``k`` is a Python or NumPy int (not a bool) >= 1."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class Head(nn.Module):
    """The interface and argument checks every head shares; subclasses supply the math.

    Models use only this interface, so a model switches heads with one argument."""

    in_features: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _make_parameters(self, rows: int, in_features: int, bias: bool, factory: dict) -> None:
        """Checks ``in_features`` and creates ``weight`` (rows, D) and ``bias`` (rows,) or None;
        ``factory`` holds the ``device`` and ``dtype`` arguments."""
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(rows, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: U(-1/sqrt(D), 1/sqrt(D)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def init_prior(self, counts, pseudocount: float = 0.1) -> None:
        """Set the bias so the head starts at the unigram prior of the class ``counts``.

        With zero weights the head then predicts ``p(c) = (counts[c] + pseudocount) / sum(...)``
        for every input; with the usual small random weights it predicts that up to the
        weights' share. A head trained with cross-entropy learns this marginal first, spending
        its first steps on it; starting there leaves its steps to the input dependence. Dense:
        ``bias = log p``; tree: each node's logits are the log ratios of its children's subtree
        masses (:func:`hsoftmax.trees.bias_from_log_prob`). The weights are not changed.

        Args:
            counts: (V,) non-negative class counts (e.g. the training targets' ``bincount``).
            pseudocount: added to every count, so a class never seen in training keeps a finite
                (small) probability; must be > 0.
        """
        if self.bias is None:
            raise ValueError("init_prior needs a head with a bias (bias=True)")
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64).reshape(-1)
        if counts.numel() != self.num_classes:
            raise ValueError(
                f"counts must have V = {self.num_classes} entries, got {counts.numel()}"
            )
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("counts must be finite and >= 0")
        if isinstance(pseudocount, bool) or not pseudocount > 0:
            raise ValueError(f"pseudocount must be > 0, got {pseudocount!r}")
        log_prob = torch.log(counts + pseudocount)
        log_prob = log_prob - torch.logsumexp(log_prob, 0)
        self.bias.copy_(self._bias_for_log_prob(log_prob).to(self.bias))

    def _bias_for_log_prob(self, log_prob: torch.Tensor) -> torch.Tensor:
        """The bias that, with zero weights, makes the head predict ``exp(log_prob)``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """V, the number of classes (leaves)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public interface

    def forward(
        self,
        hidden: torch.Tensor,
        target: torch.Tensor,
        reduction: str = "mean",
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        smoothing: str = "leaves",
    ) -> torch.Tensor:
        """Negative log-likelihood of ``target``, the contract of ``F.cross_entropy``.

        Args:
            hidden: (B, D) in the head's dtype and device.
            target: (B,) integer class ids in ``[0, V)``, or ``ignore_index``.
            reduction: ``"mean"`` (over the rows not ignored; NaN when all are, like PyTorch),
                ``"sum"`` or ``"none"`` ((B,), 0 at ignored rows).
            ignore_index: rows whose target equals it contribute 0 to the loss and its gradient.
                ``None`` (the default) ignores nothing, so every target must be a valid id.
            label_smoothing: eps in [0, 1]: ``(1 - eps) * nll + eps * mean_l(-log p(l))``, the
                uniform mixture of ``F.cross_entropy``; costs O(V * D) per example when > 0.
            smoothing: ``"leaves"`` (the above, exact over all V classes) or ``"nodes"``: every
                decision on the target's path is smoothed towards uniform over its node's
                children, ``sum_n [(1 - eps) * (-log p(c_n | n)) + eps * mean_c(-log p(c | n))]``,
                no more than the NLL itself: O(depth * D) per example on top of it, plus one sum
                of each node's weight rows per call. The two are equal for a one-level softmax
                (the dense head).
        """
        check_smoothing_mode(smoothing)
        check_reduction(reduction)
        check_label_smoothing(label_smoothing)
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self._check_hidden(hidden)
        self._check_target(target, hidden, allow=ignore_index)
        keep = None
        if ignore_index is not None:
            keep = target != ignore_index
            target = torch.where(keep, target, torch.zeros_like(target))
        if label_smoothing > 0:
            if smoothing == "nodes":
                nll, smooth = self._nll_and_node_smoothing(hidden, target)
            else:
                nll, smooth = self._nll_and_smoothing(hidden, target)
            loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        else:
            loss = -self._log_prob(hidden, target)
        if keep is not None:
            loss = torch.where(keep, loss, torch.zeros_like(loss))
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        if keep is None:
            return loss.mean()
        return loss.sum() / keep.sum().to(loss.dtype)

    def log_prob(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) ``log p(target | hidden)``, differentiable."""
        self._check_hidden(hidden)
        self._check_target(target, hidden)
        return self._log_prob(hidden, target)

    def log_prob_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probability of every class, exact and differentiable."""
        self._check_hidden(hidden)
        return self._log_prob_all(hidden)

    def log_prob_and_mean(
        self, hidden: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(ids) (B, K), mean_l log p(l) (B,))``, differentiable: the log-probabilities
        of K classes per row and the mean over all V classes, from one pass over the V classes.
        These are the terms of a label-smoothed loss over a mixture of this head with another
        distribution (the history mixture of :mod:`hsoftmax.models`)."""
        self._check_hidden(hidden)
        self._check_target(ids, hidden, name="ids")
        return self._log_prob_and_mean(hidden, ids)

    def nll_and_smoothing(
        self, hidden: torch.Tensor, target: torch.Tensor, smoothing: str = "leaves"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(-log p(target) (B,), smoothing term (B,))``, differentiable: the two terms of the
        label-smoothed loss ``(1 - eps) * nll + eps * term`` (see ``forward``). ``smoothing``:
        ``"leaves"``: ``mean_l(-log p(l))`` over all V classes, O(V * D); ``"nodes"``: the sum
        over the target's path nodes of ``mean_c(-log p(c | n))`` over the node's children,
        O(depth * D) per example beyond the NLL (a one-level head: the two are equal). For a
        model that combines the head with another distribution and smooths only the head's part
        (the history mixture)."""
        check_smoothing_mode(smoothing)
        self._check_hidden(hidden)
        self._check_target(target, hidden)
        if smoothing == "nodes":
            return self._nll_and_node_smoothing(hidden, target)
        return self._nll_and_smoothing(hidden, target)

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k classes by log-probability: ``(values (B, k'), indices (B, k'))`` with
        ``k' = min(k, V)``, ordered by log-prob descending, then class id ascending. Values are
        log-probabilities, detached (no gradient)."""
        check_k(k)
        self._check_hidden(hidden)
        with torch.no_grad():
            return self._topk(hidden.detach(), min(int(k), self.num_classes))

    def rank(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) int64 exact 1-based rank of ``target`` among all V classes (1 = most likely),
        ties broken by class id: ``1 + #{l: lp(l) > lp(y)} + #{l: lp(l) == lp(y), l < y}``."""
        self._check_hidden(hidden)
        self._check_target(target, hidden)
        with torch.no_grad():
            return self._rank(hidden.detach(), target)

    def log_prob_many(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) ``log p(ids[b, k] | hidden[b])``, differentiable: K classes per row, in the
        cheapest exact way the head has (a dense head gathers from all V; a tree head walks
        each (row, id) path, O(K * depth * D) per row)."""
        self._check_hidden(hidden)
        self._check_target(ids, hidden, name="ids")
        return self._log_prob_many(hidden, ids)

    #: True for a head that is one softmax over all classes (``log_prob_all`` are its logits up
    #: to a per-row shift), so scores can be added to the logits (the seed's history logit_add).
    is_flat: bool = False

    def ranks_by_log_prob(self, device: torch.device | str) -> bool:
        """True when ``topk``/``rank`` order classes by exactly the bits ``log_prob`` returns on
        ``device``, so a caller can compare its own values against them without the O(V)
        :meth:`ranking_log_prob_all`."""
        return False

    # ------------------------------------------------------------------ to implement

    def _log_prob_many(self, hidden, ids):
        batch, k = ids.shape
        flat = self._log_prob(hidden.repeat_interleave(k, dim=0), ids.reshape(-1))
        return flat.view(batch, k)

    def _log_prob(self, hidden, target):
        raise NotImplementedError

    def _log_prob_all(self, hidden):
        raise NotImplementedError

    def _nll_and_smoothing(self, hidden, target):
        """((B,) -log p(target), (B,) mean over classes of -log p)."""
        raise NotImplementedError

    def _nll_and_node_smoothing(self, hidden, target):
        """((B,) -log p(target), (B,) sum over the target's path nodes of the mean over the
        node's children of -log p(child | node)); a one-level head: the leaves' smoothing."""
        return self._nll_and_smoothing(hidden, target)

    def _topk(self, hidden, k):
        return topk_by_id(self._log_prob_all(hidden), k)

    def _rank(self, hidden, target):
        return rank_by_id(self._log_prob_all(hidden), target)

    @torch.no_grad()
    def ranking_log_prob_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) every class's log-probability with the bits ``topk`` and ``rank`` order by
        (``log_prob_all`` may round differently), not differentiable. For code that combines
        the head's order with its own comparisons, e.g. the history mixture's exact rank."""
        self._check_hidden(hidden)
        return self._log_prob_all(hidden.detach())

    # ------------------------------------------------------------------ checks

    def _check_hidden(self, hidden) -> None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.dim() != 2 or hidden.shape[1] != self.in_features:
            raise ValueError(
                f"hidden must have shape (B, in_features={self.in_features}), "
                f"got {tuple(hidden.shape)}"
            )
        if hidden.dtype != self.weight.dtype:
            raise TypeError(
                f"hidden dtype {hidden.dtype} must match the head's dtype {self.weight.dtype}"
            )
        if hidden.device != self.weight.device:
            raise ValueError(
                f"hidden is on {hidden.device} but the head is on {self.weight.device}"
            )

    def _check_target(self, target, hidden, allow: int | None = None, name: str = "target") -> None:
        """``target`` (B,) class ids, or (B, K) when ``name`` is ``"ids"``."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
        batch = hidden.shape[0]
        ndim = 1 if name == "target" else 2
        if target.dim() != ndim or target.shape[0] != batch:
            want = f"(B,) = ({batch},)" if ndim == 1 else f"(B, K) with B = {batch}"
            raise ValueError(f"{name} must have shape {want}, got {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
            raise TypeError(
                f"{name} must be an integer tensor (int64; uint8 and bool index as masks), "
                f"got {target.dtype}"
            )
        if target.device != hidden.device:
            raise ValueError(f"{name} is on {target.device} but hidden is on {hidden.device}")
        if target.numel() == 0 or torch.compiler.is_compiling():
            return  # a data-dependent check would break a compiled graph
        v = self.num_classes
        bad = (target < 0) | (target >= v)
        if allow is not None:
            bad &= target != allow
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = ", ".join(map(str, index))
            extra = "" if allow is None else f" or ignore_index={allow}"
            raise IndexError(
                f"{name}[{where}] = {int(target[index])} is out of range for {v} classes "
                f"(valid: 0 .. {v - 1}{extra})"
            )


def topk_by_id(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``scores`` (B, V) ordered by score descending, then column id
    ascending (``torch.topk`` leaves ties in no particular order). NaN counts as -inf.

    ``torch.topk``'s set is the answer wherever exactly k scores are >= its k-th value (one
    comparison pass); only rows with ties across the k-th place take the slower exact path."""
    scores = _nan_to_neg_inf(scores)
    top_values, top_indices = torch.topk(scores, k, dim=1)
    ambiguous = (scores >= top_values[:, -1:]).sum(1) != k
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero()[:, 0]
        top_indices = top_indices.clone()
        top_indices[rows] = _topk_ids_with_ties(scores[rows], k)
    indices = top_indices.sort(dim=1).values  # by id, so a stable sort by value keeps id order
    values = scores.gather(1, indices)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


def _topk_ids_with_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) the ids of each row's top k, ties at the k-th place resolved by lower id."""
    batch = scores.shape[0]
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(1, keepdim=True)
    take = greater | (equal & (equal.cumsum(1) <= need))  # the first `need` ties by id
    return take.nonzero()[:, 1].view(batch, k)


def _nan_to_neg_inf(scores: torch.Tensor) -> torch.Tensor:
    if scores.numel() and bool(scores.isnan().any()):
        return torch.where(scores.isnan(), float("-inf"), scores)
    return scores


def rank_by_id(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) 1-based rank of ``target`` in each row of ``scores`` under :func:`topk_by_id`'s
    order: 1 + #{higher} + #{equal with a lower id} (the id test only on rows with a tie)."""
    scores = _nan_to_neg_inf(scores)
    mine = scores.gather(1, target[:, None])
    rank = (scores > mine).sum(1) + 1
    tied = (scores == mine).sum(1) > 1
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        ids = torch.arange(scores.shape[1], device=scores.device)
        lower = (scores[rows] == mine[rows]) & (ids < target[rows, None])
        rank[rows] += lower.sum(1)
    return rank
