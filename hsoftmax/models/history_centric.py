"""``HistoryCentricModel``: a transformer over the history window with a switchable output head.

Dimension letters: B batch, L window length (padded), D ``d_model``, V locations.

The model = :class:`HistoryEncoder` (batch -> (B, D) hidden state of the last history stay) + an
output wrapper from :mod:`hsoftmax.models.history` that owns the head
(:class:`~hsoftmax.nn.HierarchicalSoftmax` or :class:`~hsoftmax.nn.DenseSoftmax`) and, optionally,
the history module. The model never touches ``torch.ops``; it only calls the head's methods.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hsoftmax.data.dataset import N_DURATIONS, N_TIME_SLOTS, N_WEEKDAYS, batch_context
from hsoftmax.nn import Dropout, check_smoothing_mode

from . import history as hist
from .layers import EncoderLayer, encode_packed

__all__ = ["ENCODER_DEFAULTS", "HistoryCentricModel", "HistoryEncoder"]

_MAX_DIFF = 64  # diff (days before the target day) is clamped to this many embedding rows
# the encoder's sizes and their defaults (the seed report's configuration): HistoryEncoder's
# keyword arguments and the model config's keys of the same names
ENCODER_DEFAULTS: dict = {
    "loc_emb_dim": 48,
    "user_emb_dim": 16,
    "time_emb_dim": 16,
    "weekday_emb_dim": 8,
    "duration_emb_dim": 16,
    "diff_emb_dim": 8,
    "d_model": 112,
    "num_layers": 4,
    "nhead": 8,
    "dim_feedforward": 224,
    "dropout": 0.2,
    "max_len": 512,
}


class HistoryEncoder(nn.Module):
    """Embeddings + causal transformer encoder; returns the state at each row's last stay.

    Input per stay: ``concat(loc_emb, user_emb, time_emb, weekday_emb, duration_emb, diff_emb)``
    -> ``Linear`` to ``d_model`` + sinusoidal position encoding -> ``num_layers`` pre-norm
    transformer layers with a causal mask and a key-padding mask -> ``LayerNorm``. The layers are
    :class:`~hsoftmax.models.layers.EncoderLayer` (``nn.TransformerEncoderLayer`` with a faster
    CPU dropout; same parameters). Histories are
    right-padded, so the last real position of row b is ``lengths[b] - 1``; with the causal mask
    no real position attends to padding, and the key-padding mask makes that explicit.
    """

    def __init__(self, n_locations: int, n_users: int, *, sparse: bool = False, **sizes):
        """``sizes``: any of :data:`ENCODER_DEFAULTS`' keys (the embedding widths, ``d_model``,
        ``num_layers``, ``nhead``, ``dim_feedforward``, ``dropout``, ``max_len``), each
        defaulting to its value there. ``sparse``: row-sparse gradients for the location
        embedding (only the batch's locations), for large vocabularies."""
        super().__init__()
        unknown = sorted(set(sizes) - set(ENCODER_DEFAULTS))
        if unknown:
            raise TypeError(
                f"HistoryEncoder got unknown sizes {unknown}; known: {list(ENCODER_DEFAULTS)}"
            )
        sizes = {**ENCODER_DEFAULTS, **sizes}
        loc_emb_dim, d_model, nhead = sizes["loc_emb_dim"], sizes["d_model"], sizes["nhead"]
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model = d_model
        # sparse: a row-sparse gradient (only the batch's locations) for large vocabularies
        self.loc_emb = nn.Embedding(n_locations, loc_emb_dim, padding_idx=0, sparse=sparse)
        self.user_emb = nn.Embedding(n_users, sizes["user_emb_dim"])
        self.time_emb = nn.Embedding(N_TIME_SLOTS, sizes["time_emb_dim"])
        self.weekday_emb = nn.Embedding(N_WEEKDAYS, sizes["weekday_emb_dim"])
        self.duration_emb = nn.Embedding(N_DURATIONS, sizes["duration_emb_dim"])
        self.diff_emb = nn.Embedding(_MAX_DIFF, sizes["diff_emb_dim"])
        width = sum(v for k, v in sizes.items() if k.endswith("_emb_dim"))
        self.input_proj = nn.Linear(width, d_model)
        self.register_buffer("position", _sinusoid(sizes["max_len"], d_model), persistent=False)
        self.dropout = Dropout(sizes["dropout"])
        layer = EncoderLayer(
            d_model,
            nhead,
            sizes["dim_feedforward"],
            sizes["dropout"],
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(
            layer, sizes["num_layers"], enable_nested_tensor=False, norm=nn.LayerNorm(d_model)
        )

    def forward(self, batch: dict[str, torch.Tensor], all_positions: bool = False) -> torch.Tensor:
        """(B, D) hidden state at the last real stay of each row of a ``collate`` batch
        ((B, L, D) at every position with ``all_positions``)."""
        x, mask = batch["x"], batch["mask"]
        batch_size, length = x.shape
        if length > self.position.shape[0]:
            raise ValueError(
                f"history length {length} exceeds max_len={self.position.shape[0]}; set "
                "data.max_len or model.max_len"
            )
        user = batch["user"][:, None].expand(batch_size, length)
        parts = [
            self.loc_emb(x),
            self.user_emb(user),
            self.time_emb(batch["time"]),
            self.weekday_emb(batch["weekday"]),
            self.duration_emb(batch["duration"]),
            self.diff_emb(batch["diff"].clamp(0, _MAX_DIFF - 1)),
        ]
        h = self.input_proj(torch.cat(parts, dim=-1)) + self.position[:length]
        h = self.dropout(h)
        causal = torch.triu(
            torch.full((length, length), float("-inf"), device=x.device, dtype=h.dtype), 1
        )
        if all(isinstance(layer, EncoderLayer) for layer in self.layers.layers):
            h = encode_packed(self.layers, h, mask, causal)
        else:  # a model built with plain nn.TransformerEncoderLayer
            pad = torch.zeros(mask.shape, device=x.device, dtype=h.dtype)
            h = self.layers(h, mask=causal, src_key_padding_mask=pad.masked_fill(~mask, -math.inf))
        if all_positions:
            return h
        last = (mask.sum(1) - 1).clamp(min=0)
        return h[torch.arange(batch_size, device=x.device), last]


def _sinusoid(max_len: int, dim: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class HistoryCentricModel(nn.Module):
    """Next-location model: :class:`HistoryEncoder` + output head (+ history module).

    Args:
        encoder: a :class:`HistoryEncoder`.
        head: an output head with the :mod:`hsoftmax.nn` interface and ``in_features =
            encoder.d_model``.
        history: ``"none"`` (head only), ``"mixture"`` (``HistoryMixture`` with a
            ``PointerScorer``, any head) or ``"logit_add"`` (``HistoryLogitAdd`` with the
            recency/frequency ``HistoryScorer``, dense head only: the seed's way); see
            :mod:`hsoftmax.models.history`.

    Every method takes a ``collate`` batch dict (``x, time, weekday, duration, diff, mask, user``;
    ``y`` where a target is needed):

    * ``model(batch, label_smoothing=0.0)`` -> scalar mean training loss (what DDP wraps);
    * ``model.log_prob(batch)`` (B,), ``model.log_prob_all(batch)`` (B, V);
    * ``model.topk(batch, k)``, ``model.rank(batch)``: exact, ties by lower id.
    """

    def __init__(
        self,
        encoder: HistoryEncoder,
        head: nn.Module,
        history: str = "mixture",
        smoothing: str = "leaves",
        memory: hist.UserMemory | None = None,
        position_loss: float = 0.0,
    ):
        super().__init__()
        if isinstance(position_loss, bool) or not (
            isinstance(position_loss, (int, float)) and 0.0 <= position_loss < math.inf
        ):
            raise ValueError(f"position_loss must be a finite weight >= 0, got {position_loss!r}")
        if memory is not None and history != "mixture":
            raise ValueError("a user memory extends the pointer: it needs history 'mixture'")
        if history not in hist.HISTORY_KINDS:
            raise ValueError(f"history must be one of {hist.HISTORY_KINDS}, got {history!r}")
        check_smoothing_mode(smoothing)
        if smoothing == "nodes" and history == "logit_add":
            raise ValueError(
                "smoothing 'nodes' (each tree decision smoothed towards uniform) is defined for "
                "a head alone or in the history mixture, not with history 'logit_add', whose "
                "label smoothing is over all classes of the combined logits"
            )
        if head.in_features != encoder.d_model:
            raise ValueError(
                f"head.in_features ({head.in_features}) must equal encoder.d_model "
                f"({encoder.d_model})"
            )
        self.history_kind = history
        self.position_loss = float(position_loss)
        self.encoder = encoder
        self.memory = memory
        if history == "none":
            self.output = hist.HeadOnly(head, smoothing)
        elif history == "mixture":
            self.output = hist.HistoryMixture(
                head, encoder.d_model, hist.PointerScorer(encoder.d_model), smoothing=smoothing
            )
        else:
            self.output = hist.HistoryLogitAdd(head, hist.HistoryScorer())

    @property
    def head(self) -> nn.Module:
        return self.output.head

    @property
    def num_classes(self) -> int:
        return self.output.num_classes

    def hidden_and_window(self, batch) -> tuple[torch.Tensor, hist.Window | None]:
        """(B, D) hidden state and the history window (None without history)."""
        hidden, window, _ = self._encode(batch, all_positions=False)
        return hidden, window

    def _encode(self, batch, all_positions: bool):
        """``(hidden, window, states)``: the (B, D) hidden state, the history window (None
        without history) and the (B, L, D) states at every position (None when neither the
        history nor ``all_positions`` needs them)."""
        if self.history_kind == "none" and not all_positions:
            return self.encoder(batch), None, None
        states = self.encoder(batch, all_positions=True)
        last = (batch["mask"].sum(1) - 1).clamp(min=0)
        hidden = states[torch.arange(states.shape[0], device=states.device), last]
        if self.history_kind == "none":
            return hidden, None, states
        if self.memory is None:
            return hidden, self.output.scorer(batch["x"], batch["mask"], hidden, states), states
        # in training, each example's own target visit is left out of its user's memory
        target = batch["y"] if self.training else None
        context = batch_context(batch) if self.memory.context_count is not None else None
        extra = self.memory(batch["user"], hidden, self.encoder.loc_emb, target, context)
        window = self.output.scorer(batch["x"], batch["mask"], hidden, states, extra)
        return hidden, window, states

    def forward(self, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0):
        """Scalar mean training loss: the negative log-likelihood (label-smoothed) of
        ``batch["y"]``, plus ``position_loss`` times :meth:`next_stay_nll` (the head's NLL of
        every history stay from the states before it) when that weight is > 0."""
        hidden, window, states = self._encode(batch, all_positions=self.position_loss > 0)
        loss = self.output(hidden, window, batch["y"], label_smoothing=label_smoothing)
        if self.position_loss > 0:
            loss = loss + self.position_loss * self.next_stay_nll(batch, states)
        return loss

    def next_stay_nll(self, batch, states: torch.Tensor | None = None) -> torch.Tensor:
        """The model's mean NLL of every history stay after the first, each predicted from the
        stays up to the one before it: the encoder state there (causal) and, with a history
        module, the window of those stays (the user memory left out). This is the window's own
        language-model loss: one encoder pass gives ~L targets instead of one, and the head's
        cost grows with them. The window's last stay predicts ``y``, which the main loss scores.
        ``states``: the encoder's (B, L, D) output for ``batch``, if already computed."""
        if states is None:
            states = self.encoder(batch, all_positions=True)
        x, mask = batch["x"], batch["mask"]
        rows, t = mask[:, 1:].nonzero(as_tuple=True)  # a stay at t + 1 to predict from t
        if rows.numel() == 0:  # no window with two stays: nothing to predict
            return states.sum() * 0.0
        hidden, target = states[rows, t], x[rows, t + 1]
        if self.history_kind == "none":
            return self.output(hidden, None, target)
        valid = mask[rows] & (torch.arange(x.shape[1], device=x.device) <= t[:, None])
        window = self.output.scorer(x[rows].masked_fill(~valid, 0), valid, hidden, states[rows])
        return self.output(hidden, window, target)

    def log_prob(self, batch) -> torch.Tensor:
        hidden, window = self.hidden_and_window(batch)
        return self.output.log_prob(hidden, window, batch["y"])

    def log_prob_all(self, batch) -> torch.Tensor:
        hidden, window = self.hidden_and_window(batch)
        return self.output.log_prob_all(hidden, window)

    @torch.no_grad()
    def topk(self, batch, k: int):
        hidden, window = self.hidden_and_window(batch)
        return self.output.topk(hidden, window, k)

    @torch.no_grad()
    def rank(self, batch) -> torch.Tensor:
        hidden, window = self.hidden_and_window(batch)
        return self.output.rank(hidden, window, batch["y"])

    @torch.no_grad()
    def loss_and_nll(self, batch, label_smoothing: float = 0.0):
        """One encoder pass: ``(loss_sum, nll_sum)`` over the batch (the label-smoothed loss
        and the plain negative log-likelihood of ``batch["y"]``)."""
        hidden, window = self.hidden_and_window(batch)
        return self._loss_and_nll(hidden, window, batch["y"], label_smoothing)

    def _loss_and_nll(self, hidden, window, y, label_smoothing):
        loss = self.output(hidden, window, y, reduction="sum", label_smoothing=label_smoothing)
        return loss, -self.output.log_prob(hidden, window, y).sum()

    def evaluate_batch(self, batch, k: int = 10, label_smoothing: float = 0.0):
        """One encoder pass: ``(loss_sum, nll_sum, topk indices (B, k'), ranks (B,))``."""
        hidden, window = self.hidden_and_window(batch)
        y = batch["y"]
        loss, nll = self._loss_and_nll(hidden, window, y, label_smoothing)
        _, top = self.output.topk(hidden, window, k)
        return loss, nll, top, self.output.rank(hidden, window, y)
