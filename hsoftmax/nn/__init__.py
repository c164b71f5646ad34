"""Output heads (modules owning parameters) and the fast dropout.

* :class:`HierarchicalSoftmax`: the fused hierarchical softmax over a :class:`~hsoftmax.Tree`.
* :class:`DenseSoftmax`: ``nn.Linear`` + log-softmax with the same interface (:class:`Head`).
* :func:`dropout` / :class:`Dropout`: ``F.dropout`` with a parallel counter-based CPU mask.
"""

from hsoftmax.nn.base import (
    SMOOTHING_MODES,
    Head,
    check_k,
    check_label_smoothing,
    check_reduction,
    check_smoothing_mode,
    rank_by_id,
    topk_by_id,
)
from hsoftmax.nn.dense import DenseSoftmax
from hsoftmax.nn.dropout import Dropout, dropout
from hsoftmax.nn.hierarchical import HierarchicalSoftmax

__all__ = [
    "SMOOTHING_MODES",
    "DenseSoftmax",
    "Dropout",
    "Head",
    "HierarchicalSoftmax",
    "check_k",
    "check_label_smoothing",
    "check_reduction",
    "check_smoothing_mode",
    "dropout",
    "rank_by_id",
    "topk_by_id",
]
