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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsoftmax import _search_ops
from hsoftmax.ops import _coef_dtype, path_log_prob
from hsoftmax.tree import Tree

__all__ = ["HierarchicalSoftmax", "DenseSoftmax"]

_REDUCTIONS = ("mean", "sum", "none")


SMOOTHING_MODES = ("leaves", "nodes")


def check_smoothing_mode(smoothing) -> None:
    """Raises ValueError unless ``smoothing`` is one of :data:`SMOOTHING_MODES`."""
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be 'leaves' or 'nodes', got {smoothing!r}")


class _Head(nn.Module):
    """The interface and argument checks both heads share; subclasses supply the math."""

    in_features: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: U(-1/sqrt(D), 1/sqrt(D)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

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
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float):
            raise TypeError(
                f"label_smoothing must be a float, got {type(label_smoothing).__name__}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
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
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
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

    # ------------------------------------------------------------------ to implement

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


class HierarchicalSoftmax(_Head):
    r"""A hierarchical-softmax output head over a :class:`~hsoftmax.Tree` with V leaves.

    ``log p(y | h) = sum over the path of y of log softmax_node(z)[child]``, where internal node
    ``n`` scores its children with ``z_0 = 0`` and ``z_k = weight[r_n + k - 1] @ h + bias[...]``
    (see :mod:`hsoftmax.tree`). ``weight`` is ``(V - 1, D)``: one row fewer than a dense head.

    ``forward``/``log_prob`` run the fused path kernel (O(depth * D) per example). ``topk`` and
    ``rank`` search the tree exactly, expanding only nodes whose prefix log-prob can still matter
    (C++, parallel over the batch, on the CPU; on other devices an exact dense fallback:
    ``log_prob_all`` then a tie-aware top-k / comparison count). ``log_prob_all`` and label
    smoothing score every row with one matmul, then work level by level over the tree.

    The tree is stored in the ``state_dict`` (buffers ``tree_parents``, ``tree_num_leaves``):
    loading a state dict replaces this head's tree, and :meth:`from_state_dict` rebuilds a head
    without the tree file.
    """

    def __init__(
        self,
        in_features: int,
        tree: Tree,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an hsoftmax.Tree, got {type(tree).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(tree.num_rows, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(tree.num_rows, **factory)) if bias else None
        self._set_tree(tree)
        self.reset_parameters()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_counts(cls, in_features: int, counts, arity: int = 2, **kwargs) -> HierarchicalSoftmax:
        """A head over the Huffman tree of class ``counts`` (frequent classes get short paths,
        which minimises the expected path length and so the training cost)."""
        return cls(in_features, Tree.huffman(counts, arity), **kwargs)

    @classmethod
    def from_features(
        cls, in_features: int, features, *, bias: bool = True, device=None, dtype=None, **tree_args
    ) -> HierarchicalSoftmax:
        """A head over ``Tree.from_features(features, **tree_args)`` (e.g. ``branching``,
        ``seed``): classes with similar feature vectors share subtrees."""
        tree = Tree.from_features(features, **tree_args)
        return cls(in_features, tree, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "") -> HierarchicalSoftmax:
        """Rebuild a head (tree, sizes, dtype, device) from a ``state_dict`` alone."""
        tree = Tree.from_parents(
            state_dict[prefix + "tree_parents"].cpu(),
            num_leaves=int(state_dict[prefix + "tree_num_leaves"]),
        )
        weight = state_dict[prefix + "weight"]
        head = cls(
            weight.shape[1],
            tree,
            bias=state_dict.get(prefix + "bias") is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        head.load_state_dict(
            {k[len(prefix) :]: v for k, v in state_dict.items() if k[: len(prefix)] == prefix}
        )
        return head

    def retree(self, new_tree: Tree, hidden: torch.Tensor | None = None) -> HierarchicalSoftmax:
        """A head over ``new_tree`` (same classes) that starts from this head's predictions.

        Rows cannot be copied between trees (a row scores a different split in each), so the
        new head gets zero weights and biases set so its distribution equals this head's
        average prediction over ``hidden`` (a sample of training hidden states; ``None``: the
        prediction at ``h = 0``) -- see :func:`hsoftmax.builders.retree_weights`. Training then
        restarts from a calibrated prior instead of a uniform one.
        """
        from hsoftmax import builders

        weight, bias = builders.retree_weights(
            self.tree,
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            new_tree,
            hidden,
        )
        head = type(self)(
            self.in_features,
            new_tree,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            head.weight.copy_(weight)
            if head.bias is not None:
                head.bias.copy_(bias)
        return head

    # ------------------------------------------------------------------ tree state

    @property
    def num_classes(self) -> int:
        return self.tree.num_leaves

    @property
    def num_leaves(self) -> int:
        """V (same as :attr:`num_classes`)."""
        return self.tree.num_leaves

    def _set_tree(self, tree: Tree) -> None:
        device = self.weight.device
        self.tree = tree
        self.register_buffer("tree_parents", tree.parents.to(device))
        self.register_buffer("tree_num_leaves", torch.tensor(tree.num_leaves, device=device))
        # Flattened eagerly (cheap, numpy), so that torch.compile never traces the flattening.
        cpu = torch.device("cpu")
        self._cache: dict = {
            "search": _search_ops.search_tree(tree),
            cpu: _FlatTree.build(tree, cpu),
        }

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key_parents, key_leaves = prefix + "tree_parents", prefix + "tree_num_leaves"
        if key_parents in state_dict and key_leaves in state_dict:
            num_leaves = int(state_dict[key_leaves])
            parents = state_dict[key_parents].detach().cpu()
            if num_leaves != self.num_leaves:
                error_msgs.append(
                    f"the state_dict holds a tree of {num_leaves} leaves but this head has "
                    f"{self.num_leaves}; build the head with HierarchicalSoftmax.from_state_dict"
                )
                return
            if not torch.equal(parents, self.tree_parents.cpu()):
                self._set_tree(Tree.from_parents(parents, num_leaves=num_leaves))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _flat(self, device: torch.device) -> _FlatTree:
        flat = self._cache.get(device)
        if flat is None:  # first use on another device: copy the CPU tensors once
            flat = _move_flat(self._cache[torch.device("cpu")], device)
            self._cache[device] = flat
        return flat

    def _search_tree(self) -> _search_ops.SearchTree:
        return self._cache["search"]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_leaves={self.num_leaves}, "
            f"depth={self.tree.depth}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ math

    def _log_prob(self, hidden, target):
        return path_log_prob(hidden, self.weight, self.bias, self.tree, target)

    def _log_prob_all(self, hidden):
        batch = hidden.shape[0]
        if self.num_leaves == 1:
            return hidden.new_zeros((batch, 1))
        flat = self._flat(hidden.device)
        z, lse, _ = self._node_logits(hidden)
        # (B, E) log p(child | parent) of every edge in level order: the child's logit (0 for
        # child 0) minus its parent's log-sum-exp
        logit = torch.where(flat.edge_zuse, z.index_select(1, flat.edge_zcol), 0.0)
        local = logit - lse.index_select(1, flat.edge_lcol)
        # Level by level, root down: an edge's child log-prob is its parent's plus its own.
        levels = []
        for d, (start, end) in enumerate(flat.level_bounds):
            here = local[:, start:end]
            if d > 0:
                here = here + levels[d - 1].index_select(1, flat.parent_edge[start:end])
            levels.append(here)
        every = levels[0] if len(levels) == 1 else torch.cat(levels, dim=1)
        return every.index_select(1, flat.leaf_edge).to(hidden.dtype)

    def _nll_and_smoothing(self, hidden, target):
        nll = -self._log_prob(hidden, target)
        if self.num_leaves == 1:
            return nll, torch.zeros_like(nll)
        return nll, self._mean_neg_log_prob(hidden).to(nll.dtype)

    def _nll_and_node_smoothing(self, hidden, target):
        # Per path node n (c_n children, logits [0, z_1 .. z_{c_n - 1}]), the smoothing term is
        # lse_n - mean_c z_c and the NLL's is lse_n - z_taken, so over the path
        #   S(y) = nll(y) + sum_n (z_taken - mean_c z_c) = nll(y) + h . u_y + beta_y,
        # with u_y = sum_n (w_taken - s_n / c_n), s_n the sum of node n's rows (beta_y likewise
        # from the bias): linear in h. u_y is a weighted sum of 2 x depth rows, whatever the
        # width of the nodes, so no (B, rows, D) gather is made.
        nll = -self._log_prob(hidden, target)
        if self.num_leaves == 1:
            return nll, torch.zeros_like(nll)
        acc = _coef_dtype(hidden.dtype)  # float32 for half types
        t = self._node_paths(hidden.device, acc)
        node, node_coef = t.node[target], t.node_coef[target]
        taken, taken_coef = t.taken[target], t.taken_coef[target]
        weight = self.weight.to(acc)
        node_sum = weight.new_zeros(t.num_nodes, weight.shape[1]).index_add(
            0, t.node_of_row, weight
        )
        u = F.embedding_bag(node, node_sum, per_sample_weights=node_coef, mode="sum")
        u = u + F.embedding_bag(taken, weight, per_sample_weights=taken_coef, mode="sum")
        linear = (u * hidden.to(acc)).sum(1)
        if self.bias is not None:
            bias = self.bias.to(acc)
            bias_sum = bias.new_zeros(t.num_nodes).index_add(0, t.node_of_row, bias)
            linear = (
                linear + (bias_sum[node] * node_coef).sum(1) + (bias[taken] * taken_coef).sum(1)
            )
        return nll, nll + linear.to(nll.dtype)

    def _node_paths(self, device: torch.device, dtype: torch.dtype) -> _NodePaths:
        key = ("node_paths", device, dtype)
        paths = self._cache.get(key)
        if paths is None:  # built on first use: (V, depth) tables
            paths = _NodePaths.build(self.tree, device, dtype)
            self._cache[key] = paths
        return paths

    def _mean_neg_log_prob(self, hidden) -> torch.Tensor:
        """(B,) ``mean_l(-log p(l))`` over the V leaves, the label-smoothing term."""
        return -self._node_logits(hidden)[2]

    def _node_logits(self, hidden):
        """``(z, lse, mean)``: every internal node's logits ``z`` (B, C) bucket by bucket (see
        :class:`_SmoothBucket`; pads hold junk), ``lse`` (B, M) ``log(1 + sum_j exp(z_j))`` per
        node in bucket order, and ``mean`` (B,) ``mean_l log p(l)`` over the V leaves.

        ``mean_l log p(l) = sum over nodes n, children c of (leaves(c) / V) * log p(c | n)``, and
        with the node's logits ``[0, z_1 .. z_{c-1}]`` (child 0's logit is the implicit 0),
        ``log p(c_j | n) = z_j - lse_n``. So the mean is ``z @ share - lse @ leaves(n) / V``: one
        product of ``hidden`` with the node rows of each bucket of nodes (padded to the bucket's
        width), one log-sum-exp per node, two matrix-vector products. Node-major (B, rows)
        tensors only: no gather or scatter of (B, V) scores.
        """
        flat = self._flat(hidden.device)
        batch = hidden.shape[0]
        dtype = _coef_dtype(hidden.dtype)  # float32 for half types
        # softplus(x) = x above the cut: exact, since log1p(e^-cut) is below half an ulp of cut
        cut = 40.0 if dtype == torch.float64 else 20.0
        zs, lses, mean = [], [], None
        for b in flat.smooth:
            if b.rows is None:
                w = self.weight[b.start : b.stop]
                bias = None if self.bias is None else self.bias[b.start : b.stop]
            else:
                w = self.weight.index_select(0, b.rows)
                bias = None if self.bias is None else self.bias.index_select(0, b.rows)
            z = F.linear(hidden, w, bias).to(dtype)  # (B, nodes * width)
            if b.width == 1:
                lse = F.softplus(z, threshold=cut)  # log(1 + e^z), binary nodes
            else:
                zz = z.view(batch, b.nodes.size, b.width)
                if b.pad is not None:
                    zz = zz.masked_fill(b.pad, -math.inf)
                lse = F.softplus(torch.logsumexp(zz, dim=-1), threshold=cut)  # log(1 + sum e^z)
            term = z @ b.share.to(dtype) - lse @ b.node_share.to(dtype)
            mean = term if mean is None else mean + term
            zs.append(z)
            lses.append(lse)
        z = zs[0] if len(zs) == 1 else torch.cat(zs, dim=1)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
        return z, lse, mean

    def _log_prob_and_mean(self, hidden, ids):
        batch, k = ids.shape
        if self.num_leaves == 1:
            zeros = hidden.new_zeros((batch, k))
            return zeros, zeros[:, 0]
        z, lse, mean = self._node_logits(hidden)
        paths = self._leaf_paths(hidden.device)
        # leaf l's log p = sum over its path of (z of the child taken, 0 for child 0) - lse(node)
        zcol, zuse = paths.zcol[ids].long(), paths.zuse[ids]  # (B, K, L)
        lcol, luse = paths.lcol[ids].long(), paths.luse[ids]
        zg = z.gather(1, zcol.view(batch, -1)).view(zcol.shape)
        lg = lse.gather(1, lcol.view(batch, -1)).view(lcol.shape)
        lp = (torch.where(zuse, zg, 0.0) - torch.where(luse, lg, 0.0)).sum(-1)
        return lp.to(hidden.dtype), mean.to(hidden.dtype)

    def _leaf_paths(self, device: torch.device) -> _LeafPaths:
        key = ("paths", device)
        paths = self._cache.get(key)
        if paths is None:  # built on first use: (V, depth) tables, too big to build eagerly
            paths = _LeafPaths.build(self.tree, self._flat(torch.device("cpu")).smooth, device)
            self._cache[key] = paths
        return paths

    def _topk(self, hidden, k):
        if hidden.device.type != "cpu":
            return super()._topk(hidden, k)
        return _search_ops.topk_leaves(hidden, self.weight, self.bias, self._search_tree(), k)

    def _rank(self, hidden, target):
        if hidden.device.type != "cpu":
            return super()._rank(hidden, target)
        return _search_ops.leaf_rank(hidden, self.weight, self.bias, self._search_tree(), target)

    @torch.no_grad()
    def ranking_log_prob_all(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_hidden(hidden)
        if hidden.device.type != "cpu":
            return super().ranking_log_prob_all(hidden)
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        return _search_ops.leaf_log_prob_all(hidden.detach(), w, b, self._search_tree())


@dataclass(frozen=True)
class _FlatTree:
    """Index tensors for the all-leaves computations (``log_prob_all``, label smoothing).

    Edges (one per non-root node) are numbered in level order: level d's edges (those out of the
    nodes at depth d) are the contiguous range ``level_bounds[d]``. ``parent_edge[e]`` is the
    position, within the previous level's range, of the edge into e's parent node.
    """

    edge_zcol: torch.Tensor  # (E,) int64: column of _node_logits' z of each level-order edge
    edge_zuse: torch.Tensor  # (E,) bool: False for a child 0 (its logit is the implicit 0)
    edge_lcol: torch.Tensor  # (E,) int64: column of _node_logits' lse of the edge's parent
    parent_edge: torch.Tensor  # (E,) int64 (0 on level 0, unused there)
    leaf_edge: torch.Tensor  # (V,) int64: the level-order edge into each leaf
    level_bounds: tuple[tuple[int, int], ...]
    smooth: tuple[_SmoothBucket, ...]  # the internal nodes, bucketed for the smoothing term

    @staticmethod
    def build(tree: Tree, device: torch.device) -> _FlatTree:
        v, n = tree.num_leaves, tree.num_nodes
        parents = tree.parents.numpy()
        child_ptr = tree.child_ptr.numpy()
        children = tree.children_flat.numpy()
        counts = np.diff(child_ptr)
        node_row_ptr = child_ptr - np.arange(child_ptr.size)  # node i owns c_i - 1 rows
        parent_of = np.repeat(np.arange(n - v), counts)  # per CSR edge (children_flat order)

        # breadth-first: the CSR edges out of each level's internal nodes
        order_parts, bounds = [], []
        frontier = np.flatnonzero(parents == -1)
        start = 0
        while True:
            internal = frontier[frontier >= v] - v
            if internal.size == 0:
                break
            sizes = counts[internal]
            firsts = np.repeat(child_ptr[internal] - np.cumsum(sizes) + sizes, sizes)
            edges = firsts + np.arange(sizes.sum())
            order_parts.append(edges)
            bounds.append((start, start + edges.size))
            start += edges.size
            frontier = children[edges]
        order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
        level_index = np.empty_like(order)
        level_index[order] = np.arange(order.size)  # CSR edge -> level-order edge
        edge_into = np.full(n, -1, dtype=np.int64)  # CSR edge into each node
        edge_into[children] = np.arange(children.size)

        leaves = np.zeros(n, dtype=np.int64)  # leaves below each node, bottom-up by level
        leaves[:v] = 1
        for s, e in reversed(bounds):
            edges = order[s:e]
            np.add.at(leaves, parent_of[edges] + v, leaves[children[edges]])
        parent_edge = np.zeros(order.size, dtype=np.int64)
        for d in range(1, len(bounds)):
            s, e = bounds[d]
            into_parent = level_index[edge_into[parent_of[order[s:e]] + v]]
            parent_edge[s:e] = into_parent - bounds[d - 1][0]

        def tensor(a, dtype=torch.int64):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        smooth = _SmoothBucket.build_all(
            counts, node_row_ptr, leaves[children] / v, child_ptr, device
        )
        zcol0, lcol = _SmoothBucket.columns(smooth, n - v)
        parent = parent_of[order]
        position = order - child_ptr[parent]  # child position among its siblings
        return _FlatTree(
            smooth=smooth,
            edge_zcol=tensor(np.where(position >= 1, zcol0[parent] + position - 1, 0)),
            edge_zuse=tensor(position >= 1, torch.bool),
            edge_lcol=tensor(lcol[parent]),
            parent_edge=tensor(parent_edge),
            leaf_edge=tensor(level_index[edge_into[:v]] if n > 1 else np.zeros(v, np.int64)),
            level_bounds=tuple(bounds),
        )


@dataclass(frozen=True)
class _SmoothBucket:
    """Internal nodes whose ``c - 1`` weight rows are padded to one ``width`` (1 for binary
    nodes, else the next power of two, so a tree has at most ~log2(max c) buckets and pads less
    than 2x), for :meth:`HierarchicalSoftmax._node_logits`."""

    width: int
    nodes: np.ndarray  # (nodes,) int64 internal-node indices (node id - V), on the CPU
    rows: torch.Tensor | None  # (nodes * width,) int64 weight rows (pads: row 0); None: a slice
    start: int  # ... the contiguous rows start:stop when rows is None
    stop: int
    pad: torch.Tensor | None  # (nodes, width) bool, True at pads; None: no padding
    share: torch.Tensor  # (nodes * width,) float64: leaves under the row's child / V (pads: 0)
    node_share: torch.Tensor  # (nodes,) float64: leaves under the node / V

    @staticmethod
    def build_all(counts, node_row_ptr, child_share, child_ptr, device) -> tuple:
        """``counts`` (M,) children per internal node, ``node_row_ptr`` (M + 1,) its first weight
        row, ``child_share`` (E,) leaves under each CSR edge's child / V."""
        rows_per_node = counts - 1  # every internal node has >= 2 children, so >= 1 row
        widths = 2 ** np.ceil(np.log2(rows_per_node)).astype(np.int64)
        buckets = []
        for width in np.unique(widths):
            nodes = np.flatnonzero(widths == width)
            need = rows_per_node[nodes]
            col = np.arange(width)
            valid = col[None, :] < need[:, None]  # (nodes, width)
            rows = np.where(valid, node_row_ptr[nodes][:, None] + col, 0)
            # row j of a node scores its child j + 1 (child 0 holds the implicit logit 0)
            edge = np.where(valid, child_ptr[nodes][:, None] + 1 + col, 0)
            share = np.where(valid, child_share[edge], 0.0)
            node_share = np.add.reduceat(child_share, child_ptr[:-1])[nodes]
            flat_rows = rows.ravel()
            contiguous = bool(valid.all()) and np.array_equal(
                flat_rows, np.arange(flat_rows[0], flat_rows[0] + flat_rows.size)
            )

            def tensor(a, dtype=torch.int64):
                return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

            buckets.append(
                _SmoothBucket(
                    width=int(width),
                    nodes=nodes,
                    rows=None if contiguous else tensor(flat_rows),
                    start=int(flat_rows[0]) if contiguous else 0,
                    stop=int(flat_rows[0] + flat_rows.size) if contiguous else 0,
                    pad=None if bool(valid.all()) else tensor(~valid, torch.bool),
                    share=tensor(share.ravel(), torch.float64),
                    node_share=tensor(node_share, torch.float64),
                )
            )
        return tuple(buckets)

    @staticmethod
    def columns(buckets: tuple[_SmoothBucket, ...], internal: int) -> tuple[np.ndarray, np.ndarray]:
        """Per internal node: the column of its first logit in the concatenated z, and of its
        log-sum-exp in the concatenated lse (:meth:`HierarchicalSoftmax._node_logits`)."""
        zcol0 = np.zeros(internal, dtype=np.int64)
        lcol = np.zeros(internal, dtype=np.int64)
        zoff = loff = 0
        for b in buckets:
            zcol0[b.nodes] = zoff + np.arange(b.nodes.size) * b.width
            lcol[b.nodes] = loff + np.arange(b.nodes.size)
            zoff += b.nodes.size * b.width
            loff += b.nodes.size
        return zcol0, lcol

    def to(self, device: torch.device) -> _SmoothBucket:
        def move(t):
            return None if t is None else t.to(device)

        return _SmoothBucket(
            width=self.width,
            nodes=self.nodes,
            rows=move(self.rows),
            start=self.start,
            stop=self.stop,
            pad=move(self.pad),
            share=self.share.to(device),
            node_share=self.node_share.to(device),
        )


def _path_entries(tree: Tree):
    """The tree's path entries (root first) as int64 arrays: ``(node, choice, leaf, position
    on the leaf's path, max depth >= 1)``."""
    compiled = tree.compiled("cpu")
    ptr = compiled.leaf_path_ptr.numpy()
    node = compiled.path_node.numpy().astype(np.int64)
    choice = compiled.path_choice.numpy().astype(np.int64)
    lengths = np.diff(ptr)
    depth = max(int(lengths.max()) if tree.num_leaves else 0, 1)
    leaf = np.repeat(np.arange(tree.num_leaves), lengths)
    return node, choice, leaf, np.arange(node.size) - ptr[leaf], depth


@dataclass(frozen=True)
class _NodePaths:
    """Each leaf's path as its internal nodes and its taken rows, padded to the tree's depth L:
    the tables of node-level smoothing (pads have coefficient 0)."""

    node: torch.Tensor  # (V, L) int64: internal node index on the path (0 at pads)
    node_coef: torch.Tensor  # (V, L) float: -1 / children of that node (0 at pads)
    taken: torch.Tensor  # (V, L) int64: weight row of the child taken (0 for child 0 and pads)
    taken_coef: torch.Tensor  # (V, L) float: 1 where a child >= 1 was taken, else 0
    node_of_row: torch.Tensor  # (V - 1,) int64: the internal node owning each weight row
    num_nodes: int  # internal nodes

    @staticmethod
    def build(tree: Tree, device, dtype) -> _NodePaths:
        node, choice, leaf, at, depth = _path_entries(tree)
        row_ptr = tree.compiled("cpu").node_row_ptr.numpy().astype(np.int64)
        v, m = tree.num_leaves, row_ptr.size - 1
        tables = {
            "node": np.zeros((v, depth), dtype=np.int64),
            "node_coef": np.zeros((v, depth), dtype=np.float64),
            "taken": np.zeros((v, depth), dtype=np.int64),
            "taken_coef": np.zeros((v, depth), dtype=np.float64),
        }
        tables["node"][leaf, at] = node
        tables["node_coef"][leaf, at] = -1.0 / (row_ptr[node + 1] - row_ptr[node] + 1)
        picked = choice >= 1
        tables["taken"][leaf[picked], at[picked]] = row_ptr[node[picked]] + choice[picked] - 1
        tables["taken_coef"][leaf[picked], at[picked]] = 1.0
        tables["node_of_row"] = np.repeat(np.arange(m), np.diff(row_ptr))
        out = {k: torch.as_tensor(a, device=device) for k, a in tables.items()}
        for k in ("node_coef", "taken_coef"):
            out[k] = out[k].to(dtype)
        return _NodePaths(**out, num_nodes=m)


@dataclass(frozen=True)
class _LeafPaths:
    """Each leaf's path as columns of :meth:`HierarchicalSoftmax._node_logits`' outputs, padded
    to the tree's depth L: ``log p(l) = sum_j [zuse] z[zcol] - [luse] lse[lcol]``."""

    zcol: torch.Tensor  # (V, L) int32: column of z of the child taken (0 where unused)
    zuse: torch.Tensor  # (V, L) bool: a child >= 1 was taken (child 0's logit is 0)
    lcol: torch.Tensor  # (V, L) int32: column of lse of the path's node (0 at pads)
    luse: torch.Tensor  # (V, L) bool: a node of the path (False at pads)

    @staticmethod
    def build(tree: Tree, buckets: tuple[_SmoothBucket, ...], device) -> _LeafPaths:
        zcol0, lcol = _SmoothBucket.columns(buckets, tree.num_nodes - tree.num_leaves)
        node, choice, leaf, pos, width = _path_entries(tree)
        v = tree.num_leaves
        tables = {name: np.zeros((v, width), dtype=np.int32) for name in ("zcol", "lcol")}
        masks = {name: np.zeros((v, width), dtype=bool) for name in ("zuse", "luse")}
        tables["lcol"][leaf, pos] = lcol[node]
        masks["luse"][leaf, pos] = True
        taken = choice >= 1
        tables["zcol"][leaf[taken], pos[taken]] = zcol0[node[taken]] + choice[taken] - 1
        masks["zuse"][leaf[taken], pos[taken]] = True
        return _LeafPaths(
            **{name: torch.as_tensor(a, device=device) for name, a in {**tables, **masks}.items()}
        )


@torch.compiler.disable
def _move_flat(flat: _FlatTree, device: torch.device) -> _FlatTree:
    names = ("edge_zcol", "edge_zuse", "edge_lcol", "parent_edge", "leaf_edge")
    moved = {name: getattr(flat, name).to(device) for name in names}
    smooth = tuple(b.to(device) for b in flat.smooth)
    return _FlatTree(level_bounds=flat.level_bounds, smooth=smooth, **moved)


class DenseSoftmax(_Head):
    """A plain ``Linear`` + log-softmax head with :class:`HierarchicalSoftmax`'s interface.

    ``forward`` equals ``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)``;
    ``topk`` and ``rank`` score all V classes and apply the same tie rule.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self._num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}"
        )

    def _log_prob_all(self, hidden):
        logits = F.linear(hidden, self.weight, self.bias)
        if logits.dtype in (torch.float16, torch.bfloat16):
            return logits.float().log_softmax(1).to(hidden.dtype)
        return logits.log_softmax(1)

    def _log_prob(self, hidden, target):
        return self._log_prob_all(hidden).gather(1, target[:, None])[:, 0]

    def _nll_and_smoothing(self, hidden, target):
        lp = self._log_prob_all(hidden)
        return -lp.gather(1, target[:, None])[:, 0], -lp.mean(1)

    def _log_prob_and_mean(self, hidden, ids):
        lp = self._log_prob_all(hidden)
        return lp.gather(1, ids), lp.mean(1)


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
