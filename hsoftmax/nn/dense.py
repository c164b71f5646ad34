"""The dense head: ``nn.Linear`` + log-softmax with the interface of every head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsoftmax.nn.base import Head

__all__ = ["DenseSoftmax"]


class DenseSoftmax(Head):
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
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self._num_classes = num_classes
        self._make_parameters(num_classes, in_features, bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    is_flat = True

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}"
        )

    def _bias_for_log_prob(self, log_prob):
        return log_prob  # log-softmax of the bias alone

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

    def _log_prob_many(self, hidden, ids):
        return self._log_prob_all(hidden).gather(1, ids)
