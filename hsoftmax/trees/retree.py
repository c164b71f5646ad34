"""Moving a trained head to a new tree: biases that reproduce a leaf distribution."""

from __future__ import annotations

import math

import numpy as np
import torch

from hsoftmax import ops
from hsoftmax.tree import Tree


def bias_from_log_prob(tree: Tree, leaf_log_prob) -> torch.Tensor:
    """(V - 1,) bias that, with zero weights, makes the head's distribution exactly
    ``softmax(leaf_log_prob)`` for every hidden state.

    At internal node ``n`` the logit of child ``k`` is ``S(c_k) - S(c_0)``, where ``S(c)`` is
    the log-sum-exp of ``leaf_log_prob`` over the leaves below ``c``: then ``p(c_k | n)`` is the
    share of ``n``'s probability mass under ``c_k``, and the product along a path is the leaf's
    probability. A leaf with ``-inf`` log-probability is floored at 30 nats below the least
    likely other leaf, so every logit stays finite and trainable. Computed in float64.
    """
    lp = torch.as_tensor(leaf_log_prob, dtype=torch.float64).detach().cpu().reshape(-1)
    v = tree.num_leaves
    if lp.numel() != v:
        raise ValueError(f"leaf_log_prob must have V = {v} entries, got {lp.numel()}")
    if torch.isnan(lp).any() or torch.isposinf(lp).any():
        raise ValueError("leaf_log_prob must not contain NaN or +inf")
    if v == 1:
        return torch.zeros(0, dtype=torch.float64)
    finite = torch.isfinite(lp)
    if not finite.any():
        raise ValueError("leaf_log_prob must have at least one finite entry")
    if v == 1:
        return torch.zeros(0, dtype=torch.float64)
    # -inf leaves get a floor far below the rest, so every logit stays finite
    lp = torch.clamp(lp, min=float(lp[finite].min()) - 30.0).numpy()
    lp = lp - np.logaddexp.reduce(lp)
    parents = tree.parents.numpy()
    mass = np.full(parents.size, -np.inf)  # S(node): log of the probability below node
    mass[:v] = lp
    height = _node_height(parents, v)
    for h in range(1, int(height.max()) + 1):
        kids = np.flatnonzero(height[parents.clip(min=0)] == h)
        kids = kids[parents[kids] >= 0]
        np.logaddexp.at(mass, parents[kids], mass[kids])
    child_ptr = tree.child_ptr.numpy()
    children = tree.children_flat.numpy()
    first = np.repeat(children[child_ptr[:-1]], np.diff(child_ptr))
    not_first = np.ones(children.size, dtype=bool)
    not_first[child_ptr[:-1]] = False
    return torch.from_numpy(mass[children][not_first] - mass[first][not_first])


def _node_height(parents: np.ndarray, num_leaves: int) -> np.ndarray:
    """Height of every node (leaves 0, a parent one more than its tallest child)."""
    height = np.zeros(parents.size, dtype=np.int64)
    frontier = np.arange(num_leaves)
    while frontier.size:
        child = frontier[parents[frontier] >= 0]
        np.maximum.at(height, parents[child], height[child] + 1)
        frontier = np.unique(parents[child])
    return height


def retree_weights(
    old_tree: Tree,
    old_weight: torch.Tensor,
    old_bias: torch.Tensor | None,
    new_tree: Tree,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters for ``new_tree`` that start where the old head's marginal left off.

    The new head gets zero weights and the bias of :func:`bias_from_log_prob` for the old head's
    marginal ``log mean_b p_old(y | hidden_b)`` over the given hidden states (``hidden=None``: the
    distribution at ``h = 0``, i.e. the old bias alone). So the new head predicts the old head's
    average distribution for every input -- a calibrated prior, never worse than uniform -- and its
    weights learn the input dependence again from the gradient, which is non-zero at zero
    weights. Exact per-input transfer is impossible in general: the new tree's node logits are
    not linear functions of the old ones.

    Returns:
        ``(weight, bias)`` of shapes (V - 1, D) and (V - 1,), in ``old_weight``'s dtype/device.
    """
    if old_tree.num_leaves != new_tree.num_leaves:
        raise ValueError(
            f"new_tree has {new_tree.num_leaves} leaves but old_tree has {old_tree.num_leaves}"
        )
    dim = old_weight.shape[1]
    with torch.no_grad():
        if hidden is None:
            hidden = torch.zeros(1, dim)
        h = hidden.detach().to(torch.float64).cpu()
        if h.dim() != 2 or h.shape[1] != dim:
            raise ValueError(f"hidden must have shape (B, {dim}), got {tuple(hidden.shape)}")
        w = old_weight.detach().to(torch.float64).cpu()
        b = None if old_bias is None else old_bias.detach().to(torch.float64).cpu()
        marginal = torch.zeros(old_tree.num_leaves, dtype=torch.float64) - math.inf
        for start in range(0, max(1, h.shape[0]), 256):  # bounded memory: 256 x V at a time
            chunk = ops.leaf_log_prob_all(h[start : start + 256], w, b, old_tree)
            marginal = torch.logaddexp(marginal, torch.logsumexp(chunk, 0))
        bias = bias_from_log_prob(new_tree, marginal)
    weight = torch.zeros(new_tree.num_rows, dim, dtype=old_weight.dtype, device=old_weight.device)
    return weight, bias.to(dtype=old_weight.dtype, device=old_weight.device)
