"""Plain-PyTorch references for the hierarchical softmax, shared by tests and benchmarks.

Two independent formulations of the math in :func:`hsoftmax.ops.path_log_prob`:

* :func:`log_prob_all` scores every leaf from ``tree.parents`` alone (it derives the row layout
  itself, not from the compiled tensors the kernels use) - the oracle for tests.
* :func:`path_log_prob` gathers each example's path rows and runs a batched matmul - the usual
  way to write HS in PyTorch, and the baseline the benchmarks time.

Dimension letters: B batch, D hidden, V leaves, N nodes, M internal nodes, L max depth,
C max children.
"""

from __future__ import annotations

import torch

from hsoftmax.tree import Tree


def _layout(parents: torch.Tensor, num_leaves: int):
    """Per non-root node: parent's internal index, position among siblings, and its weight row
    (-1 for a first child), following the documented rule: internal nodes in id order, children in
    id order, children 1.. take consecutive rows."""
    n = parents.numel()
    nodes = torch.arange(n)
    nonroot = nodes[parents >= 0]
    par = parents[nonroot]
    order = torch.argsort(par * n + nonroot)  # by (parent, id)
    nonroot, par = nonroot[order], par[order]
    first = torch.ones_like(par, dtype=torch.bool)
    first[1:] = par[1:] != par[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(par.numel()), 0), 0).values
    position = torch.arange(par.numel()) - group_start
    not_first = position > 0
    row = torch.full_like(position, -1)
    row[not_first] = torch.arange(int(not_first.sum()))
    return nonroot, par - num_leaves, position, row


def log_prob_all(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tree: Tree
) -> torch.Tensor:
    """(B, V) log-probability of every leaf, computed top-down level by level."""
    v = tree.num_leaves
    parents = tree.parents
    batch = hidden.shape[0]
    if v == 1:  # a single leaf is certain; keep the graph connected so grads are zeros
        return (hidden * 0).sum(1, keepdim=True)
    nodes, parent_idx, position, row = _layout(parents, v)
    device = hidden.device
    nodes, parent_idx, row = nodes.to(device), parent_idx.to(device), row.to(device)
    scores = hidden @ weight.T
    if bias is not None:
        scores = scores + bias
    logits = torch.zeros(batch, nodes.numel(), dtype=hidden.dtype, device=device)
    has_row = row >= 0
    logits[:, has_row] = scores[:, row[has_row]]
    m = tree.num_nodes - v
    # log-normaliser of each internal node: logsumexp of its children's logits
    peak = torch.full((batch, m), float("-inf"), dtype=hidden.dtype, device=device)
    peak = peak.scatter_reduce(1, parent_idx.expand(batch, -1), logits, "amax")
    shifted = torch.exp(logits - peak[:, parent_idx])
    total = torch.zeros(batch, m, dtype=hidden.dtype, device=device).index_add_(
        1, parent_idx, shifted
    )
    lse = peak + torch.log(total)
    local = logits - lse[:, parent_idx]  # log p(child | parent)
    # accumulate down the tree: parents are finalised before their children (order by depth)
    node_logp = torch.zeros(batch, tree.num_nodes, dtype=hidden.dtype, device=device)
    depth = _node_depth(parents)[nodes.cpu()].to(device)
    for d in range(1, int(depth.max()) + 1):
        sel = depth == d
        node_logp[:, nodes[sel]] = node_logp[:, parent_idx[sel] + v] + local[:, sel]
    return node_logp[:, :v]


def _node_depth(parents: torch.Tensor) -> torch.Tensor:
    depth = torch.zeros_like(parents)
    cur = parents.clone()
    while bool((cur >= 0).any()):
        alive = cur >= 0
        depth[alive] += 1
        cur[alive] = parents[cur[alive]]
    return depth


def path_log_prob(hidden, weight, bias, tree: Tree, target) -> torch.Tensor:
    """(B,) log p(target | hidden) by gathering each example's path rows (B, L, C - 1, D); the
    arguments of :func:`hsoftmax.ops.path_log_prob`."""
    paths = tree.padded_paths(hidden.device)
    rows, choice, valid = paths.rows, paths.choice, paths.valid
    if rows.shape[1] == 0:
        return (hidden * 0).sum(1)
    r = rows[target]  # (B, L, C-1), -1 where a node has fewer children or the path ended
    w = weight[r.clamp_min(0)]  # (B, L, C-1, D)
    z = torch.einsum("bd,blcd->blc", hidden, w)
    if bias is not None:
        z = z + bias[r.clamp_min(0)]
    z = z.masked_fill(r < 0, float("-inf"))
    z = torch.cat([torch.zeros_like(z[..., :1]), z], dim=-1)  # the first child's logit is 0
    logp = torch.log_softmax(z, dim=-1).gather(-1, choice[target].unsqueeze(-1)).squeeze(-1)
    return (logp * valid[target]).sum(-1)
