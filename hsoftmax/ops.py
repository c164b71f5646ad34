"""Typed, validated entry points to the ``torch.ops.hsoftmax`` op family: every public op.

* :func:`path_log_prob`: the fused path log-probability, differentiable (CPU and CUDA).
* :func:`topk_leaves`, :func:`leaf_rank`, :func:`leaf_log_prob_all`: exact tree searches (CPU,
  not differentiable: they return ids, ranks and detached values).
* :func:`dropout_mask`: the counter-based dropout keep mask (CPU).

Dimension letters: B batch, D hidden size, V leaves (classes), R ``tree.max_path_rows``.

The C++ library defines the schemas, the kernels and the autograd formula of
``path_log_prob_forward`` (csrc/path_log_prob_autograd.cpp: in C++ because a Python formula cost a
quarter of a training step's time in interpreter overhead); this file registers the fake (meta)
kernels, so the ops work under ``torch.compile`` and pass ``torch.library.opcheck``. Models and
heads call these functions, never ``torch.ops`` directly.
"""

from __future__ import annotations

import torch

from hsoftmax import _build  # noqa: F401  (loads the library and checks its torch version)
from hsoftmax.tree import Tree

__all__ = [
    "accumulate_dtype",
    "dropout_mask",
    "leaf_log_prob_all",
    "leaf_rank",
    "path_log_prob",
    "topk_leaves",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def path_log_prob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tree: Tree,
    target: torch.Tensor,
    sparse_grad: bool = False,
) -> torch.Tensor:
    r"""Log-probability of each target leaf under the hierarchical softmax over ``tree``.

    .. math::
        \log p(y \mid h) = \sum_{(n, j) \in \mathrm{path}(y)}
            \Big(z_{n,j} - \log \sum_{k=0}^{c_n - 1} e^{z_{n,k}}\Big),\qquad
        z_{n,0} = 0,\; z_{n,k} = w_{r_n + k - 1} \cdot h + b_{r_n + k - 1}

    where the path visits internal node ``n`` (with ``c_n`` children, rows ``r_n ..``) and takes
    its child ``j``. A binary tree gives word2vec/fastText's sigmoid hierarchical softmax.

    Args:
        hidden: (B, D) float16/bfloat16/float32/float64; reduced precisions accumulate in float32.
        weight: (V - 1, D), same dtype and device as ``hidden``.
        bias: (V - 1,) or None.
        tree: the :class:`~hsoftmax.Tree` with V leaves.
        target: (B,) integer leaf ids in ``[0, V)``.
        sparse_grad: return the weight and bias gradients as sparse COO tensors holding only
            the rows this batch touched (at most ``B * R``), like ``nn.Embedding(sparse=True)``;
            the backward then costs O(B * R * D) instead of O(V * D). CPU only, eager only. Use
            an optimizer that accepts sparse gradients (``torch.optim.SGD``, ``SparseAdam``).

    Returns:
        (B,) ``log p(target | hidden)`` in ``hidden``'s dtype, differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``.

    Determinism: the forward and backward are bit-reproducible on CPU and CUDA: the weight and
    bias gradients are per-row sums in a fixed order (on CUDA a sorted segmented sum, no
    atomics; see docs/cuda.md). The CUDA path has been verified only under emulation so far.
    """
    _check_args(hidden, weight, bias, tree, target)
    if sparse_grad and hidden.device.type != "cpu":
        raise NotImplementedError("sparse_grad=True is implemented on CPU only")
    if sparse_grad and not all(p is None or p.is_contiguous() for p in (weight, bias)):
        raise ValueError(
            "sparse_grad=True needs a contiguous weight and bias: a sparse gradient cannot flow "
            "back through the copy that makes a strided one contiguous"
        )
    compiled = tree.compiled(hidden.device)
    # the forward then also sums grad_hidden's basis while the path's weight rows are in cache
    hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    log_prob, _, _ = torch.ops.hsoftmax.path_log_prob_forward(
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        compiled.node_row_ptr,
        compiled.leaf_path_ptr,
        compiled.path_node,
        compiled.path_choice,
        target.to(torch.int64).contiguous(),
        tree.max_path_rows,
        bool(sparse_grad),
        hidden_grad,
    )
    return log_prob


def _check_args(hidden, weight, bias, tree, target) -> None:
    """Validate at the door, with messages naming the argument: no kernel sees bad input."""
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an hsoftmax.Tree, got {type(tree).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (B, D), got {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    batch, dim = hidden.shape
    rows = tree.num_leaves - 1
    if tuple(weight.shape) != (rows, dim):
        raise ValueError(
            f"weight must have shape (V - 1, D) = ({rows}, {dim}) for a tree of {tree.num_leaves} "
            f"leaves, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape (V - 1,) = ({rows},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must have shape (B,) = ({batch},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (int64), got {target.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if target.numel() and target.device.type != "meta" and not torch.compiler.is_compiling():
        # Eager only: a data-dependent check would break a compiled graph. The CPU kernel checks
        # again; the CUDA kernel writes NaN for an out-of-range target instead of reading memory.
        lo, hi = (int(x) for x in torch.aminmax(target))
        if lo < 0 or hi >= tree.num_leaves:
            bad = lo if lo < 0 else hi
            index = int((target == bad).nonzero()[0, 0])
            raise IndexError(
                f"target[{index}] = {bad} is out of range for a tree of {tree.num_leaves} leaves "
                f"(valid: 0 .. {tree.num_leaves - 1})"
            )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for inputs of ``dtype``: float64 for float64, else
    float32 (reduced precisions accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("hsoftmax::path_log_prob_forward")
def _forward_fake(
    hidden,
    weight,
    bias,
    node_row_ptr,
    leaf_path_ptr,
    path_node,
    path_choice,
    target,
    max_path_rows,
    sparse_grad=False,
    hidden_grad=False,
):
    batch = hidden.shape[0]
    acc = accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty((batch,)),
        hidden.new_empty((batch, max_path_rows), dtype=acc),
        hidden.new_empty(tuple(hidden.shape) if hidden_grad else (0,), dtype=acc),
    )


@torch.library.register_fake("hsoftmax::path_log_prob_backward")
def _backward_fake(
    grad_log_prob,
    grad_coef,
    hidden,
    weight,
    node_row_ptr,
    leaf_path_ptr,
    path_node,
    path_choice,
    target,
    has_bias,
    output_mask,
    sparse_weight=False,
):
    # the number of rows a batch touches is data-dependent: a dynamic size when sparse
    rows = torch.library.get_ctx().new_dynamic_size() if sparse_weight else weight.shape[0]
    grad_hidden = torch.empty_like(hidden) if output_mask[0] else hidden.new_empty((0,))
    grad_weight = weight.new_empty((rows, weight.shape[1]) if output_mask[1] else (0,))
    grad_bias = weight.new_empty((rows,) if output_mask[2] and has_bias else (0,))
    grad_rows = weight.new_empty((rows if sparse_weight else 0,), dtype=torch.int64)
    return grad_hidden, grad_weight, grad_bias, grad_rows


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "double backward through hsoftmax path_log_prob (a second derivative, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward) is not implemented"
    )


# Without this, a second derivative through the backward op would be silently dropped (None)
# with only a warning; with it, only an actual double backward raises.
def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "hsoftmax::path_log_prob_backward", _double_backward, setup_context=_no_context
)


# ---------------------------------------------------------------------------- tree searches


def _search_args(hidden, weight, bias, tree: Tree) -> tuple:
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be an hsoftmax.Tree, got {type(tree).__name__}")
    t = tree.search_tables()
    return (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        t.child_ptr,
        t.children,
        t.node_row_ptr,
    )


def topk_leaves(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tree: Tree,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k leaves by ``log p(leaf | hidden)``, by best-first search (CPU).

    Args:
        hidden: (B, D); weight: (V - 1, D); bias: (V - 1,) or None, all one dtype, on the CPU.
        tree: the :class:`~hsoftmax.Tree` with V leaves.
        k: 1 <= k <= V.

    Returns:
        values (B, k) in ``hidden``'s dtype (accumulated in :func:`accumulate_dtype`) and indices
        (B, k) int64, ordered by log-prob descending, then leaf id ascending. Deterministic: the
        result does not depend on the thread count. Arguments are validated by
        :class:`hsoftmax.nn.HierarchicalSoftmax` (the kernels check again).
    """
    args = _search_args(hidden, weight, bias, tree)
    return torch.ops.hsoftmax.topk_leaves(*args, tree.search_tables().root, k)


def leaf_rank(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tree: Tree,
    target: torch.Tensor,
) -> torch.Tensor:
    """(B,) int64 1-based rank of ``target`` among all V leaves, by pruned depth-first search.

    ``rank = 1 + #{l : lp(l) > lp(y)} + #{l : lp(l) == lp(y), l < y}``: the position of ``y`` in
    the order of :func:`topk_leaves` with ``k = V``.
    """
    args = _search_args(hidden, weight, bias, tree)
    t = tree.search_tables()
    return torch.ops.hsoftmax.leaf_rank(
        *args,
        t.leaf_path_ptr,
        t.path_node,
        t.path_choice,
        t.root,
        target.to(torch.int64).contiguous(),
    )


def leaf_log_prob_all(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tree: Tree
) -> torch.Tensor:
    """(B, V) ``log p(leaf | hidden)`` of every leaf with the bits :func:`topk_leaves` and
    :func:`leaf_rank` order by (CPU, not differentiable)."""
    args = _search_args(hidden, weight, bias, tree)
    return torch.ops.hsoftmax.leaf_log_prob_all(*args, tree.search_tables().root)


@torch.library.register_fake("hsoftmax::leaf_log_prob_all")
def _leaf_log_prob_all_fake(hidden, weight, bias, child_ptr, children, node_row_ptr, root):
    return hidden.new_empty((hidden.shape[0], weight.shape[0] + 1))


@torch.library.register_fake("hsoftmax::topk_leaves")
def _topk_leaves_fake(hidden, weight, bias, child_ptr, children, node_row_ptr, root, k):
    batch = hidden.shape[0]
    return hidden.new_empty((batch, k)), hidden.new_empty((batch, k), dtype=torch.int64)


@torch.library.register_fake("hsoftmax::leaf_rank")
def _leaf_rank_fake(
    hidden,
    weight,
    bias,
    child_ptr,
    children,
    node_row_ptr,
    leaf_path_ptr,
    path_node,
    path_choice,
    root,
    target,
):
    return target.new_empty((hidden.shape[0],), dtype=torch.int64)


# ---------------------------------------------------------------------------- dropout


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A dropout keep mask shaped like ``x`` (CPU): each element ``1 / (1 - p)`` with
    probability ``1 - p``, else 0, from a counter-based hash of ``(seed, element index)``, so the
    mask depends on ``seed`` alone, not on the thread count. Not differentiable."""
    return torch.ops.hsoftmax.dropout_mask(x, p, seed)


@torch.library.register_fake("hsoftmax::dropout_mask")
def _dropout_mask_fake(self, p, seed):
    return torch.empty_like(self, memory_format=torch.contiguous_format)
