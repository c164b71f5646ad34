"""The hierarchical-softmax head over a :class:`~hsoftmax.Tree` (see :mod:`hsoftmax.nn.base`
for the interface, tie rule and label smoothing it shares with the dense head)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from hsoftmax import ops
from hsoftmax.nn.base import Head
from hsoftmax.tree import Tree

__all__ = ["HierarchicalSoftmax"]


class HierarchicalSoftmax(Head):
    r"""A hierarchical-softmax output head over a :class:`~hsoftmax.Tree` with V leaves.

    ``log p(y | h) = sum over the path of y of log softmax_node(z)[child]``, where internal node
    ``n`` scores its children with ``z_0 = 0`` and ``z_k = weight[r_n + k - 1] @ h + bias[...]``
    (see :mod:`hsoftmax.tree`). ``weight`` is ``(V - 1, D)``: one row fewer than a dense head.

    ``forward``/``log_prob`` run the fused path kernel (O(depth * D) per example). ``topk`` and
    ``rank`` search the tree exactly, expanding only nodes whose prefix log-prob can still matter
    (C++, parallel over the batch, on the CPU; on other devices an exact dense fallback:
    ``log_prob_all`` then a tie-aware top-k / comparison count). ``log_prob_all`` and label
    smoothing score every row with one matmul, then work level by level over the tree.

    ``sparse_grad=True`` makes the loss's weight and bias gradients row-sparse (only the rows the
    batch's paths touch, as ``nn.Embedding(sparse=True)``; CPU): train them with
    :class:`hsoftmax.optim.SparseAdamW`. ``log_prob_all`` and label smoothing over leaves score
    every row and still give dense gradients.

    ``tree`` is a :class:`~hsoftmax.Tree` or the path of a tree file (``Tree.save``,
    ``hsoftmax tree build``). The tree is stored in the ``state_dict`` (buffers
    ``tree_parents``, ``tree_num_leaves``): loading a state dict replaces this head's tree, and
    :meth:`from_state_dict` rebuilds a head without the tree file.
    """

    def __init__(
        self,
        in_features: int,
        tree: Tree | str | os.PathLike,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sparse_grad: bool = False,
    ):
        super().__init__()
        self.sparse_grad = bool(sparse_grad)
        if isinstance(tree, str | os.PathLike):
            tree = Tree.load(tree)
        if not isinstance(tree, Tree):
            raise TypeError(
                f"tree must be an hsoftmax.Tree or a tree file's path, got {type(tree).__name__}"
            )
        self._make_parameters(tree.num_rows, in_features, bias, {"device": device, "dtype": dtype})
        self._set_tree(tree)
        self.reset_parameters()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_counts(cls, in_features: int, counts, arity: int = 2, **kwargs) -> HierarchicalSoftmax:
        """A head over the Huffman tree of class ``counts`` (frequent classes get short paths,
        which minimises the expected path length and so the training cost)."""
        from hsoftmax import trees

        return cls(in_features, trees.huffman(counts, arity), **kwargs)

    @classmethod
    def from_features(
        cls, in_features: int, features, *, bias: bool = True, device=None, dtype=None, **tree_args
    ) -> HierarchicalSoftmax:
        """A head over ``trees.from_features(features, **tree_args)`` (e.g. ``branching``,
        ``seed``): classes with similar feature vectors share subtrees."""
        from hsoftmax import trees

        tree = trees.from_features(features, **tree_args)
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
        prediction at ``h = 0``) -- see :func:`hsoftmax.trees.retree_weights`. Training then
        restarts from a calibrated prior instead of a uniform one.
        """
        from hsoftmax.trees import retree_weights

        weight, bias = retree_weights(
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

    def _bias_for_log_prob(self, log_prob):
        from hsoftmax.trees import bias_from_log_prob

        return bias_from_log_prob(self.tree, log_prob)

    def ranks_by_log_prob(self, device: torch.device | str) -> bool:
        # on the CPU, log_prob, topk and rank all accumulate each path root-down in one order
        return torch.device(device).type == "cpu"

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
        # Flattened eagerly (cheap, numpy; cached on the tree), so that torch.compile never
        # traces the flattening.
        tree.search_tables()
        tree.level_tables("cpu")

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

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_leaves={self.num_leaves}, "
            f"depth={self.tree.depth}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ math

    def _log_prob(self, hidden, target):
        sparse = self.sparse_grad and hidden.device.type == "cpu" and torch.is_grad_enabled()
        return ops.path_log_prob(hidden, self.weight, self.bias, self.tree, target, sparse)

    def _log_prob_all(self, hidden):
        batch = hidden.shape[0]
        if self.num_leaves == 1:
            return hidden.new_zeros((batch, 1))
        flat = self.tree.level_tables(hidden.device)
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
        acc = ops.accumulate_dtype(hidden.dtype)  # float32 for half types
        t = self.tree.node_paths(hidden.device, acc)
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

    def _mean_neg_log_prob(self, hidden) -> torch.Tensor:
        """(B,) ``mean_l(-log p(l))`` over the V leaves, the label-smoothing term."""
        return -self._node_logits(hidden)[2]

    def _node_logits(self, hidden):
        """``(z, lse, mean)``: every internal node's logits ``z`` (B, C) bucket by bucket (see
        :class:`hsoftmax._tables.SmoothBucket`; pads hold junk), ``lse`` (B, M)
        ``log(1 + sum_j exp(z_j))`` per node in bucket order, and ``mean`` (B,)
        ``mean_l log p(l)`` over the V leaves.

        ``mean_l log p(l) = sum over nodes n, children c of (leaves(c) / V) * log p(c | n)``, and
        with the node's logits ``[0, z_1 .. z_{c-1}]`` (child 0's logit is the implicit 0),
        ``log p(c_j | n) = z_j - lse_n``. So the mean is ``z @ share - lse @ leaves(n) / V``: one
        product of ``hidden`` with the node rows of each bucket of nodes (padded to the bucket's
        width), one log-sum-exp per node, two matrix-vector products. Node-major (B, rows)
        tensors only: no gather or scatter of (B, V) scores.
        """
        flat = self.tree.level_tables(hidden.device)
        batch = hidden.shape[0]
        dtype = ops.accumulate_dtype(hidden.dtype)  # float32 for half types
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
        paths = self.tree.leaf_paths(hidden.device)
        # leaf l's log p = sum over its path of (z of the child taken, 0 for child 0) - lse(node)
        zcol, zuse = paths.zcol[ids].long(), paths.zuse[ids]  # (B, K, L)
        lcol, luse = paths.lcol[ids].long(), paths.luse[ids]
        zg = z.gather(1, zcol.view(batch, -1)).view(zcol.shape)
        lg = lse.gather(1, lcol.view(batch, -1)).view(lcol.shape)
        lp = (torch.where(zuse, zg, 0.0) - torch.where(luse, lg, 0.0)).sum(-1)
        return lp.to(hidden.dtype), mean.to(hidden.dtype)

    def _topk(self, hidden, k):
        if hidden.device.type != "cpu":
            return super()._topk(hidden, k)
        return ops.topk_leaves(hidden, self.weight, self.bias, self.tree, k)

    def _rank(self, hidden, target):
        if hidden.device.type != "cpu":
            return super()._rank(hidden, target)
        return ops.leaf_rank(hidden, self.weight, self.bias, self.tree, target)

    @torch.no_grad()
    def ranking_log_prob_all(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_hidden(hidden)
        if hidden.device.type != "cpu":
            return super().ranking_log_prob_all(hidden)
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        return ops.leaf_log_prob_all(hidden.detach(), w, b, self.tree)
