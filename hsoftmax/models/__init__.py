"""Next-location models: :class:`HistoryCentricModel` and its history module.

* :mod:`~hsoftmax.models.history_centric`: the transformer encoder and the model;
* :mod:`~hsoftmax.models.history`: window scores, the pointer-generator mixture (any head) and
  the seed's logit addition (dense head);
* :mod:`~hsoftmax.models.factory`: building a model from a config, parameter counts and budget;
* :mod:`~hsoftmax.models.layers`: the encoder layer (packed positions, fast CPU dropout).
"""

from .ensemble import Ensemble
from .factory import (
    HEADS,
    MODEL_DEFAULTS,
    TREES,
    ParameterBudgetError,
    build_head,
    build_model,
    build_tree,
    check_budget,
    parameter_report,
)
from .history import (
    HISTORY_KINDS,
    HeadOnly,
    HistoryLogitAdd,
    HistoryMixture,
    HistoryScorer,
    PointerScorer,
    UserMemory,
    Window,
    masked_logsumexp,
)
from .history_centric import HistoryCentricModel, HistoryEncoder
from .layers import EncoderLayer, encode_packed

__all__ = [
    "HEADS",
    "HISTORY_KINDS",
    "EncoderLayer",
    "Ensemble",
    "MODEL_DEFAULTS",
    "TREES",
    "HeadOnly",
    "HistoryCentricModel",
    "HistoryEncoder",
    "HistoryLogitAdd",
    "HistoryMixture",
    "HistoryScorer",
    "ParameterBudgetError",
    "PointerScorer",
    "UserMemory",
    "Window",
    "build_head",
    "build_model",
    "build_tree",
    "check_budget",
    "encode_packed",
    "masked_logsumexp",
    "parameter_report",
]
