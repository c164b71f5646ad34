"""``Ensemble``: several trained models combined at the probability level.

Dimension letters: B batch, V classes, M models.

``p(y) = mean_m p_m(y)``, computed in log space as ``logsumexp_m log p_m(y) - log M`` over every
class, so top-k and rank are exact over all V classes (ties by lower id, as every head's). Each
member is used only through its public ``log_prob_all(batch)``: the members may mix heads, trees,
history modules and sizes, as long as they share the classes. The cost is M times a member's
``log_prob_all``, O(M * V * D) per row: meant for evaluation, not for training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hsoftmax.nn import check_label_smoothing, rank_by_id, topk_by_id

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """The mean of the members' distributions, with the model interface the evaluation uses
    (``log_prob_all``, ``log_prob``, ``topk``, ``rank``, ``loss_and_nll``, ``evaluate_batch``).

    Args:
        models: two or more models (anything with ``log_prob_all(batch)`` -> (B, V) and
            ``num_classes``), all over the same V classes.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
        sizes = sorted({int(m.num_classes) for m in models})
        if len(sizes) != 1:
            raise ValueError(f"the models must share their classes, got num_classes {sizes}")
        self.members = nn.ModuleList(models)

    @property
    def num_classes(self) -> int:
        return int(self.members[0].num_classes)

    @torch.no_grad()
    def log_prob_all(self, batch) -> torch.Tensor:
        """(B, V) ``log mean_m p_m(l)`` for every class l."""
        stacked = torch.stack([m.log_prob_all(batch) for m in self.members])
        return torch.logsumexp(stacked, dim=0) - math.log(len(self.members))

    def log_prob(self, batch) -> torch.Tensor:
        """(B,) log-probability of ``batch["y"]``."""
        return self.log_prob_all(batch).gather(1, batch["y"][:, None]).squeeze(1)

    def topk(self, batch, k: int):
        """(values, indices), each (B, k): exact, by log-probability then lower id."""
        return topk_by_id(self.log_prob_all(batch), k)

    def rank(self, batch) -> torch.Tensor:
        """(B,) 1-based rank of ``batch["y"]`` in :meth:`topk`'s order."""
        return rank_by_id(self.log_prob_all(batch), batch["y"])

    def _loss_and_nll(self, log_p, y, label_smoothing):
        nll = -log_p.gather(1, y[:, None]).squeeze(1)
        # label smoothing over all classes ("leaves"): exact, as every member's log-probs are here
        loss = (1.0 - label_smoothing) * nll - label_smoothing * log_p.mean(1)
        return loss.sum(), nll.sum()

    def loss_and_nll(self, batch, label_smoothing: float = 0.0):
        """``(loss_sum, nll_sum)`` over the batch: the label-smoothed loss ("leaves") and the
        plain negative log-likelihood of ``batch["y"]``."""
        check_label_smoothing(label_smoothing)
        return self._loss_and_nll(self.log_prob_all(batch), batch["y"], label_smoothing)

    def evaluate_batch(self, batch, k: int = 10, label_smoothing: float = 0.0):
        """``(loss_sum, nll_sum, topk indices (B, k), ranks (B,))`` from one pass per member."""
        check_label_smoothing(label_smoothing)
        log_p, y = self.log_prob_all(batch), batch["y"]
        loss, nll = self._loss_and_nll(log_p, y, label_smoothing)
        _, top = topk_by_id(log_p, min(k, log_p.shape[1]))
        return loss, nll, top, rank_by_id(log_p, y)
