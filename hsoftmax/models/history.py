"""The history module: scores for the locations of the input window, and three ways to combine
them with an output head (:class:`HeadOnly`, :class:`HistoryMixture`, :class:`HistoryLogitAdd`).

Dimension letters: B batch, L window length (padded), D hidden size, V classes, K candidates.

All three wrappers share one interface, the head's plus the window:

* ``out(hidden, window, target, reduction=, label_smoothing=)``: negative log-likelihood;
* ``out.log_prob(hidden, window, target)`` (B,), ``out.log_prob_all(hidden, window)`` (B, V);
* ``out.topk(hidden, window, k)``, ``out.rank(hidden, window, target)``: exact, ties by lower id.

``window`` is a :class:`Window` (the locations of each example's history and their scores),
made by :class:`HistoryScorer` from the batch. The wrappers only use the head's public methods
(``forward``, ``log_prob``, ``log_prob_all``, ``topk``, ``rank``): they work with any head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsoftmax import nn as heads
from hsoftmax.data.dataset import N_CONTEXT_SLOTS, N_WEEKDAYS

__all__ = [
    "HISTORY_KINDS",
    "HeadOnly",
    "HistoryLogitAdd",
    "HistoryMixture",
    "HistoryScorer",
    "PointerScorer",
    "UserMemory",
    "Window",
    "masked_logsumexp",
]

HISTORY_KINDS = ("none", "mixture", "logit_add")
_NEG_INF = float("-inf")
# a prediction context: target weekday x two-hour slot (hsoftmax.data.dataset.context_id)
_CONTEXT_SHAPE = (N_WEEKDAYS, N_CONTEXT_SLOTS)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log sum_{mask} exp(x)`` along ``dim``; ``-inf`` where the mask is empty.

    Safe for autograd: no NaN gradient, also for empty masks or ``-inf`` entries outside the mask
    (``torch.logsumexp`` over all ``-inf`` gives NaN gradients). Masked-out entries get gradient 0.
    """
    peak = torch.where(mask, x, _NEG_INF).amax(dim, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = torch.where(mask, x - peak, torch.zeros_like(x))  # 0 outside: exp stays finite
    total = torch.where(mask, shifted.exp(), torch.zeros_like(x)).sum(dim, keepdim=True)
    some = total > 0
    out = torch.where(
        some,
        torch.log(torch.where(some, total, torch.ones_like(total))) + peak,
        torch.full_like(total, _NEG_INF),
    )
    return out.squeeze(dim)


@dataclass
class Window:
    """The history window of a batch, as the history module sees it.

    Attributes:
        loc: (B, L) int64 location ids (0 at padding).
        valid: (B, L) bool, True on real history entries.
        first: (B, L) bool, True at the first occurrence of each distinct location of a row.
        score: (B, L) history score of the position's location (equal for repeated locations).
        log_p: (B, L) ``log p_hist`` of the position's location: a softmax of ``score`` over the
            row's distinct locations; ``-inf`` at padding.
    """

    loc: torch.Tensor
    valid: torch.Tensor
    first: torch.Tensor
    score: torch.Tensor
    log_p: torch.Tensor

    @property
    def num_distinct(self) -> torch.Tensor:
        """(B,) number of distinct locations per row."""
        return self.first.sum(1)

    def log_p_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) ``log p_hist`` of the ids (B, K): ``-inf`` for ids outside the window."""
        match = (ids[:, :, None] == self.loc[:, None, :]) & self.valid[:, None, :]
        # every matching position holds the same value: amax picks it and is -inf if none
        return torch.where(match, self.log_p[:, None, :], _NEG_INF).amax(-1)

    def score_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) history score of the ids (B, K): 0 for ids outside the window."""
        match = (ids[:, :, None] == self.loc[:, None, :]) & self.valid[:, None, :]
        found = torch.where(match, self.score[:, None, :], _NEG_INF).amax(-1)
        return torch.where(match.any(-1), found, torch.zeros_like(found))

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: is ``ids[b, k]`` in row b's window."""
        return ((ids[:, :, None] == self.loc[:, None, :]) & self.valid[:, None, :]).any(-1)


class HistoryScorer(nn.Module):
    """Scores the locations of the input window by recency and frequency.

    For location ``l`` seen at window positions ``j`` (``age_j`` = stays between ``j`` and the
    end of the window, 0 for the last stay)::

        score(l) = w_recency * sum_j exp(-decay * age_j) + w_frequency * log(count(l))

    with ``decay = softplus(decay_raw)`` > 0; ``w_recency``, ``w_frequency`` and ``decay_raw`` are
    learned scalars (3 parameters). ``p_hist`` is the softmax of ``score`` over the window's
    distinct locations.
    """

    def __init__(self, decay: float = 0.3, w_recency: float = 1.0, w_frequency: float = 1.0):
        super().__init__()
        self.decay_raw = nn.Parameter(torch.tensor(math.log(math.expm1(decay))))
        self.w_recency = nn.Parameter(torch.tensor(float(w_recency)))
        self.w_frequency = nn.Parameter(torch.tensor(float(w_frequency)))

    def forward(self, loc: torch.Tensor, valid: torch.Tensor, hidden=None, states=None) -> Window:
        """Window scores for ``loc`` (B, L) int64 and ``valid`` (B, L) bool (right-padded);
        ``hidden`` and ``states`` are accepted for :class:`PointerScorer`'s interface, unused."""
        if loc.shape != valid.shape or loc.dim() != 2:
            raise ValueError(
                f"loc and valid must have one shape (B, L), got {tuple(loc.shape)} and "
                f"{tuple(valid.shape)}"
            )
        dtype = self.w_recency.dtype
        length = valid.sum(1, keepdim=True)
        pos = torch.arange(loc.shape[1], device=loc.device)
        age = (length - 1 - pos[None, :]).clamp(min=0).to(dtype)
        recency = torch.exp(-F.softplus(self.decay_raw) * age) * valid.to(dtype)
        same = (loc[:, :, None] == loc[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        same_f = same.to(dtype)
        rec = (same_f * recency[:, None, :]).sum(-1)
        count = same_f.sum(-1).clamp(min=1.0)
        score = self.w_recency * rec + self.w_frequency * torch.log(count)
        earlier = torch.ones_like(same).tril(-1)  # [j, j'] = j' < j
        first = valid & ~(same & earlier).any(-1)
        log_z = masked_logsumexp(score, first, dim=1)[:, None]
        ok = valid & torch.isfinite(log_z)
        log_p = torch.where(ok, score - torch.where(ok, log_z, 0.0), _NEG_INF)
        return Window(loc=loc, valid=valid, first=first, score=score, log_p=log_p)


def _window_from_position_logits(loc, valid, logits) -> Window:
    """A :class:`Window` whose ``p_hist`` is the softmax over positions of ``logits`` (B, L),
    summed over the positions of each location (``score`` = the log of that unnormalised sum).

    The per-location sums take O(L log L) per row: each row's entries are sorted by location
    (stably, padding last), so a location's entries are one run; a run's log-sum-exp is
    scattered from the run's entries and gathered back to each of them."""
    batch, length = loc.shape
    key = torch.where(valid, loc, torch.iinfo(loc.dtype).max)  # padding sorts after every id
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    starts = torch.ones_like(valid)
    starts[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    run = starts.cumsum(1) - 1  # (B, L): the run (distinct location) of each sorted entry
    ok_sorted = valid.gather(1, order)
    x = logits.gather(1, order)
    peak = torch.where(ok_sorted, x, _NEG_INF).detach()
    peak = peak.new_full((batch, length), _NEG_INF).scatter_reduce(1, run, peak, "amax")
    peak = peak.gather(1, run)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = torch.where(ok_sorted, x - peak, torch.zeros_like(x))  # 0 outside: exp finite
    terms = torch.where(ok_sorted, shifted.exp(), torch.zeros_like(x))
    total = torch.zeros_like(x).scatter_add(1, run, terms).gather(1, run)
    some = ok_sorted & (total > 0)
    per_loc_sorted = torch.where(
        some, torch.log(torch.where(some, total, torch.ones_like(total))) + peak, _NEG_INF
    )
    positions = torch.arange(length, device=loc.device).expand(batch, length)
    unsort = torch.empty_like(order).scatter_(1, order, positions)
    per_loc = per_loc_sorted.gather(1, unsort)
    first = (starts & ok_sorted).gather(1, unsort)  # a stable sort keeps the earliest first
    log_z = masked_logsumexp(logits, valid, dim=1)[:, None]
    ok = valid & torch.isfinite(log_z)
    log_p = torch.where(ok, per_loc - torch.where(ok, log_z, 0.0), _NEG_INF)
    score = torch.where(valid, per_loc, torch.zeros_like(per_loc))
    return Window(loc=loc, valid=valid, first=first, score=score, log_p=log_p)


class PointerScorer(nn.Module):
    """Pointer attention over the window, conditioned on the model's state (pointer-generator).

    Position j of the window gets the logit ``a_j = <W_q h, W_k s_j> / sqrt(d_key) - decay *
    age_j`` (``h`` the hidden state that predicts, ``s_j`` the encoder state at position j,
    ``age_j`` the number of stays after j, ``decay = softplus(decay_raw)`` learned), and
    ``p_hist(l) = sum_{j: x_j = l} softmax(a)_j``: frequency enters through the sum, recency
    through the decay and the states. Unlike a fixed recency/frequency score it can learn, e.g.,
    that the current location is rarely the next one.
    """

    def __init__(self, d_model: int, d_key: int = 32, decay: float = 0.1):
        super().__init__()
        self.d_key = d_key
        self.query = nn.Linear(d_model, d_key)
        self.key = nn.Linear(d_model, d_key, bias=False)
        self.decay_raw = nn.Parameter(torch.tensor(math.log(math.expm1(decay))))

    def forward(self, loc, valid, hidden=None, states=None, extra=None) -> Window:
        """Window for ``loc``, ``valid`` (B, L), ``hidden`` (B, D) and ``states`` (B, L, D).

        ``extra``: more entries ``(loc (B, N), valid (B, N), logits (B, N))`` on the logit scale
        of the positions' (e.g. :class:`UserMemory`'s), softmaxed together with the window's."""
        if hidden is None or states is None:
            raise ValueError("PointerScorer needs the hidden state and the per-position states")
        length = valid.sum(1, keepdim=True)
        pos = torch.arange(loc.shape[1], device=loc.device)
        age = (length - 1 - pos[None, :]).clamp(min=0).to(hidden.dtype)
        q = self.query(hidden)[:, :, None]
        logits = (self.key(states) @ q).squeeze(-1) / math.sqrt(self.d_key)
        logits = logits - F.softplus(self.decay_raw) * age
        if extra is not None:
            mem_loc, mem_valid, mem_logits = extra
            loc, valid = torch.cat([loc, mem_loc], 1), torch.cat([valid, mem_valid], 1)
            logits = torch.cat([logits, mem_logits], 1)
        logits = torch.where(valid, logits, torch.zeros_like(logits))
        return _window_from_position_logits(loc, valid, logits)


class UserMemory(nn.Module):
    """Each user's most visited training locations, as extra pointer entries.

    The window holds only the last ``previous_day`` days; a user also returns to places last
    seen weeks ago. This memory holds, per user, the ``size`` locations most often visited as
    training targets and their counts (buffers, computed once from the training split: no
    validation or test data). Entry ``l`` of user u gets the logit

    ``<W_q h, W_k e(l)> / sqrt(d_key) + w * log(count_u(l)) + b``

    (``e`` the model's location embedding; ``W_q``, ``W_k``, ``w``, ``b`` learned) and joins the
    pointer's softmax, so ``p_hist`` covers the window and the memory and top-k stays exact.
    In training (``target`` given) each example's own target visit is left out of the counts
    (a location visited only then drops out), so the memory never tells a training example its
    own answer.

    **Context counts** (``context_count`` given): each entry also counts the user's training
    visits in each prediction context ``c`` = (target weekday, two-hour slot in which the last
    stay ends; :func:`hsoftmax.data.dataset.context_id`), and an example in context ``c`` adds

    ``w_c · [log1p(n_u(l, c)), log1p(n_u(l, weekday(c))), log1p(n_u(l, slot(c)))]``

    to the entry's logit (``w_c`` three learned weights): the weekly and daily routines
    (Tuesday's sports club, the usual lunch place) that a window of the last days often misses.
    The leave-one-out applies to these counts too.

    Args:
        loc: (U, N) int64 location ids per user (0 = empty slot).
        count: (U, N) visit counts (0 = empty slot).
        d_model: the hidden size D; ``emb_dim``: the location embedding's width.
        context_count: optional (U, N, 7, 12) visit counts per target weekday and two-hour slot
            (:meth:`context_tables`); ``forward`` then needs each example's context.
    """

    def __init__(self, loc: torch.Tensor, count: torch.Tensor, d_model: int, emb_dim: int,
                 d_key: int = 32, context_count: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if loc.shape != count.shape or loc.dim() != 2:
            raise ValueError(
                f"loc and count must have one shape (U, N), got {tuple(loc.shape)} and "
                f"{tuple(count.shape)}"
            )
        self.register_buffer("loc", loc.to(torch.int64))
        self.register_buffer("count", count.to(torch.float32))
        self.d_key = d_key
        self.query = nn.Linear(d_model, d_key)
        self.key = nn.Linear(emb_dim, d_key, bias=False)
        self.w_count = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("context_count", None)
        if context_count is not None:
            if context_count.shape != (*loc.shape, *_CONTEXT_SHAPE):
                raise ValueError(
                    f"context_count must have shape (U, N, {_CONTEXT_SHAPE[0]}, "
                    f"{_CONTEXT_SHAPE[1]}) = {(*loc.shape, *_CONTEXT_SHAPE)}, got "
                    f"{tuple(context_count.shape)}"
                )
            self.register_buffer("context_count", context_count.to(torch.float32))
            self.w_context = nn.Parameter(torch.full((3,), 0.5))

    @staticmethod
    def tables(user: np.ndarray, y: np.ndarray, n_users: int, size: int):
        """((U, size) ids, (U, size) counts): each user's ``size`` most frequent targets (ties:
        lower id first) from training examples' users and targets."""
        user, y = np.asarray(user, dtype=np.int64), np.asarray(y, dtype=np.int64)
        loc = np.zeros((n_users, size), dtype=np.int64)
        count = np.zeros((n_users, size), dtype=np.float32)
        pairs, n = np.unique(np.stack([user, y], axis=1), axis=0, return_counts=True)
        # by user, then count descending, then id ascending
        order = np.lexsort((pairs[:, 1], -n, pairs[:, 0]))
        pairs, n = pairs[order], n[order]
        first = np.searchsorted(pairs[:, 0], pairs[:, 0], side="left")
        slot = np.arange(len(pairs)) - first
        keep = slot < size
        loc[pairs[keep, 0], slot[keep]] = pairs[keep, 1]
        count[pairs[keep, 0], slot[keep]] = n[keep]
        return torch.from_numpy(loc), torch.from_numpy(count)

    @staticmethod
    def context_tables(user: np.ndarray, y: np.ndarray, context: np.ndarray,
                       loc: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(U, N, 7, 12) counts of the training examples (``user``, target ``y``, ``context`` in
        0..83) per memory entry ``loc`` (U, N) of :meth:`tables` and context."""
        user, y = np.asarray(user, dtype=np.int64), np.asarray(y, dtype=np.int64)
        context = np.asarray(context, dtype=np.int64)
        n_contexts = _CONTEXT_SHAPE[0] * _CONTEXT_SHAPE[1]
        if context.shape != y.shape or (len(context) and not 0 <= context.min() <= context.max()
                                        < n_contexts):  # fmt: skip
            raise ValueError(f"context must be ints in [0, {n_contexts}), one per example")
        table = loc.numpy()
        n_users, size = table.shape
        span = max(int(table.max(initial=0)), int(y.max(initial=0))) + 1
        keys = np.arange(n_users)[:, None] * span + table  # every (user, location) entry
        order = np.argsort(keys, axis=None, kind="stable")
        flat = keys.ravel()[order]
        query = user * span + y
        pos = np.searchsorted(flat, query).clip(0, len(flat) - 1)
        found = (flat[pos] == query) & (y > 0)
        counts = np.zeros((n_users * size, n_contexts), dtype=np.float32)
        np.add.at(counts, (order[pos[found]], context[found]), 1.0)
        return torch.from_numpy(counts.reshape(n_users, size, *_CONTEXT_SHAPE))

    def forward(self, user, hidden, embed, target=None, context=None):
        """``(loc, valid, logits)``, each (B, N), for the users (B,) given the hidden states
        (B, D), the location embedding ``embed``, in training the targets (B,), and, with
        context counts, each example's context (B,) in 0..83."""
        loc, count = self.loc[user], self.count[user]
        hit = None if target is None else (loc == target[:, None]).to(count.dtype)
        if hit is not None:
            count = count - hit
        valid = count > 0
        q = self.query(hidden)[:, :, None]
        logits = (self.key(embed(loc)) @ q).squeeze(-1) / math.sqrt(self.d_key)
        logits = logits + self.w_count * torch.log(count.clamp(min=1.0)) + self.bias
        if self.context_count is not None:
            if context is None:
                raise ValueError("this memory has context counts: pass each example's context")
            logits = logits + self._context_features(user, context, hit) @ self.w_context
        return loc, valid, logits

    def _context_features(self, user, context, hit) -> torch.Tensor:
        """(B, N, 3): log1p of the entry's counts in the context, on its weekday, in its slot."""
        weekday, slot = context // _CONTEXT_SHAPE[1], context % _CONTEXT_SHAPE[1]
        # only the example's weekday row and slot column of each entry's (7, 12) table are read
        on_weekday = self.context_count[user, :, weekday]  # (B, N, 12)
        in_slot = self.context_count[user, :, :, slot]  # (B, N, 7)
        at_slot = slot[:, None, None].expand(-1, on_weekday.shape[1], 1)
        feats = torch.stack(
            [on_weekday.gather(2, at_slot)[..., 0], on_weekday.sum(2), in_slot.sum(2)], dim=-1
        )
        if hit is not None:  # the example's own visit is in all three of its context's counts
            feats = feats - hit[:, :, None]
        return torch.log1p(feats.clamp(min=0.0))


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    heads.check_reduction(reduction)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


class HeadOnly(nn.Module):
    """No history: the head alone, behind the window-taking interface."""

    def __init__(self, head: nn.Module, smoothing: str = "leaves"):
        super().__init__()
        self.head = head
        self.smoothing = smoothing  # the head's label-smoothing mode: "leaves" or "nodes"

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, hidden, window, target, reduction="mean", label_smoothing=0.0):
        return self.head(
            hidden,
            target,
            reduction=reduction,
            label_smoothing=label_smoothing,
            smoothing=self.smoothing,
        )

    def log_prob(self, hidden, window, target):
        return self.head.log_prob(hidden, target)

    def log_prob_all(self, hidden, window):
        return self.head.log_prob_all(hidden)

    def topk(self, hidden, window, k):
        return self.head.topk(hidden, k)

    def rank(self, hidden, window, target):
        return self.head.rank(hidden, target)


class HistoryMixture(nn.Module):
    r"""Pointer-generator mixture of the window's history distribution and any head:

    ``p(y) = g * p_hist(y) + (1 - g) * p_head(y)``, ``g = sigmoid(gate(hidden))``,

    with ``p_hist`` a distribution over the window's distinct locations (0 outside the window),
    by default :class:`PointerScorer`'s attention over the window positions. In log space,
    ``log p(y) = logaddexp(log g + log p_hist(y), log(1 - g) + log p_head(y))``: training needs
    only ``log p_head(target)``, one path of the tree. ``p`` sums to 1 over the V classes because
    both components do.

    **Exact top-k.** Let W be a row's window (m distinct locations). A class outside W has
    ``p(l) = (1 - g) p_head(l)``, so among classes outside W the mixture orders like the head.
    The mixture's top-k holds at most k classes outside W, and they are the head's best k classes
    outside W; at most m of the head's top-(k + m) lie in W, so those k are inside the head's
    top-(k + m). Hence ``topk_mix ⊆ W ∪ topk_head(k + m)``: score that candidate set exactly and
    take its best k (in the order below).

    **Exact rank.** ``rank(y) = 1 + #{l in W beating y} + #{l outside W beating y}`` where l beats
    y if it comes first in the order below. If y is outside W, the second count is
    the head's own: ``head.rank(y) - 1 - #{l in W beating y under the head}``. If y is in W,
    it is the number of classes outside W whose ``log(1-g) + log p_head(l)`` beats ``log p(y)``.
    Those classes are a prefix of the head's own order, so for a tree head on the CPU they are
    counted from the head's pruned top-k, grown until its last value can no longer beat y
    (``log(1-g) + last < log p(y)``); a row still unresolved at ``_SEARCH_MAX_K`` classes, and
    any other head, scores all V classes for that row.

    Order and rounding: classes are ordered by mixture log-prob, then by the head's log-prob,
    then by lower id, all as computed (floats). Outside W the mixture value ``log(1-g) +
    log p_head`` is a monotone function of the head's, so with the head's value as the second key
    the order there is exactly the head's own, even where rounding makes two mixture values
    equal; ``topk`` and ``rank`` use the head's values with the bits its own ``topk``/``rank``
    use (a tree head on the CPU: ``log_prob``, which has the search's bits; otherwise
    ``head.ranking_log_prob_all``), so ``topk(V)`` lists the target at position ``rank``.

    A row with an empty window has ``g = 0``: the mixture is the head.

    **Label smoothing** (``forward``'s ``label_smoothing = eps``), by ``smoothing``:

    * ``"leaves"`` (default): the mixture's own, ``(1 - eps) * (-log p(y)) + eps *
      mean_l(-log p(l))`` over all V classes, exact (O(V * D) per row for any head);
    * ``"nodes"``: ``(1 - eps) * (-log p(y)) + eps * S_head(y)``, where ``S_head`` is the head's
      node smoothing term (``head.nll_and_smoothing(..., "nodes")``: the sum over the target's
      tree path of ``mean_c(-log p_head(c | n))``), O(depth * D) per row beyond the NLL. Only
      the head's decisions are smoothed; the gate and the history distribution are trained by
      the likelihood alone. For a dense head ``S_head = mean_l(-log p_head(l))``.
    """

    def __init__(
        self,
        head: nn.Module,
        in_features: int,
        scorer: nn.Module | None = None,
        smoothing: str = "leaves",
    ):
        super().__init__()
        heads.check_smoothing_mode(smoothing)
        self.smoothing = smoothing
        self.head = head
        self.scorer = scorer if scorer is not None else PointerScorer(in_features)
        self.gate = nn.Linear(in_features, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # g = 0.5 at the start

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def log_gates(self, hidden: torch.Tensor, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, 1) log g, (B, 1) log(1 - g)); g = 0 for a row whose window is empty (no
        history distribution to mix in), so that row is the head's distribution."""
        self._check_window(hidden, window)
        a = self.gate(hidden)
        log_g, log_1mg = F.logsigmoid(a), F.logsigmoid(-a)
        empty = (window.num_distinct == 0)[:, None]
        return log_g.masked_fill(empty, _NEG_INF), log_1mg.masked_fill(empty, 0.0)

    def _check_window(self, hidden, window: Window) -> None:
        """Every method passes through log_gates, hence here: a window of another batch or with
        ids outside [0, V) would silently drop history mass."""
        if window.loc.dim() != 2 or window.loc.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"window.loc must have shape (B, L) with B = {hidden.shape[0]}, "
                f"got {tuple(window.loc.shape)}"
            )
        if window.loc.numel() == 0 or torch.compiler.is_compiling():
            return
        bad = window.valid & ((window.loc < 0) | (window.loc >= self.num_classes))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise IndexError(
                f"window.loc[{where[0]}, {where[1]}] = {int(window.loc[where])} is out of range "
                f"for {self.num_classes} classes"
            )

    def _mix(self, log_g, log_1mg, log_hist, log_head):
        return torch.logaddexp(log_g + log_hist, log_1mg + log_head)

    def forward(self, hidden, window: Window, target, reduction="mean", label_smoothing=0.0):
        """Negative log-likelihood of ``target`` under the mixture; ``label_smoothing`` eps gives
        ``(1 - eps) * nll + eps * term``, the term set by ``self.smoothing`` (class docstring)."""
        heads.check_label_smoothing(label_smoothing)
        log_g, log_1mg = self.log_gates(hidden, window)
        if label_smoothing == 0 or self.smoothing == "nodes":  # one path of the head
            if label_smoothing == 0:
                log_head = self.head.log_prob_many(hidden, target[:, None])
            else:
                nll_head, smooth = self.head.nll_and_smoothing(hidden, target, "nodes")
                log_head = -nll_head[:, None]
            log_hist = window.log_p_of(target[:, None])
            loss = -self._mix(log_g, log_1mg, log_hist, log_head)[:, 0]
            if label_smoothing > 0:
                loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
            return _reduce(loss, reduction)
        # one pass over the head scores the target (column 0), every window position and the
        # mean of log p_head over all V classes
        ids = torch.cat([target[:, None], window.loc], dim=1)
        log_head, mean_head = self.head.log_prob_and_mean(hidden, ids)
        log_hist = torch.cat([window.log_p_of(target[:, None]), window.log_p], dim=1)
        mix = self._mix(log_g, log_1mg, log_hist, log_head)
        nll = -mix[:, 0]
        # sum_l log p(l) = V log(1-g) + sum_l log p_head(l)
        #                  + sum_{l in W} [log p(l) - log(1-g) - log p_head(l)]
        v = self.num_classes
        base = log_1mg[:, 0] + mean_head
        lift = mix[:, 1:] - log_1mg - log_head[:, 1:]
        lift = torch.where(window.first, lift, torch.zeros_like(lift)).sum(1)
        smooth = -(base + lift / v)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        return _reduce(loss, reduction)

    def log_prob(self, hidden, window: Window, target) -> torch.Tensor:
        """(B,) ``log p(target)`` under the mixture, differentiable."""
        log_g, log_1mg = self.log_gates(hidden, window)
        log_head = self.head.log_prob_many(hidden, target[:, None])
        return self._mix(log_g, log_1mg, window.log_p_of(target[:, None]), log_head)[:, 0]

    def log_prob_all(self, hidden, window: Window) -> torch.Tensor:
        """(B, V) mixture log-probabilities of every class (O(V * D) per row)."""
        log_g, log_1mg = self.log_gates(hidden, window)
        log_head = self.head.log_prob_all(hidden)
        out = log_1mg + log_head
        # every position writes the value of its location (padding too: looked up by id), so
        # repeated indices carry identical values and the scatter is deterministic
        log_hist = window.log_p_of(window.loc)
        at_window = self._mix(log_g, log_1mg, log_hist, log_head.gather(1, window.loc))
        return out.scatter(1, window.loc, at_window)

    def _head_ranking(self, hidden) -> torch.Tensor | None:
        """The head's log-probs of all classes with the bits its own ``topk``/``rank`` order by,
        or None for a tree head on the CPU, whose per-class values (``log_prob``), top-k and
        rank already share their bits and need no O(V) pass."""
        if self.head.ranks_by_log_prob(hidden.device):
            return None
        return self.head.ranking_log_prob_all(hidden)

    def _head_values(self, hidden, ids, lp_all) -> torch.Tensor:
        """(B, K) the head's log-probs of ``ids`` from the source ``_head_ranking`` chose."""
        if lp_all is None:
            return self.head.log_prob_many(hidden, ids)
        return lp_all.gather(1, ids)

    @torch.no_grad()
    def topk(self, hidden, window: Window, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of the mixture: (values (B, k'), indices (B, k')), k' = min(k, V),
        by log-prob descending, then the head's log-prob descending, then id ascending (see
        the class docstring for the proof)."""
        heads.check_k(k)
        v = self.num_classes
        k = min(int(k), v)
        m = int(window.num_distinct.max()) if window.loc.numel() else 0
        lp_all = self._head_ranking(hidden)
        if lp_all is None:
            _, head_ids = self.head.topk(hidden, min(k + m, v))
        else:
            head_ids = heads.topk_by_id(lp_all, min(k + m, v))[1]
        ids = torch.cat([window.loc, head_ids], dim=1)
        log_g, log_1mg = self.log_gates(hidden, window)
        log_head = self._head_values(hidden, ids, lp_all)
        values = self._mix(log_g, log_1mg, window.log_p_of(ids), log_head)
        ids, order = ids.sort(1)  # by id, then stable sorts by head value and by mixture value
        values, log_head = values.gather(1, order), log_head.gather(1, order)
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        values = values.masked_fill(dup, _NEG_INF)
        log_head = log_head.masked_fill(dup, _NEG_INF)
        by_head = log_head.sort(dim=1, descending=True, stable=True).indices
        ids, values = ids.gather(1, by_head), values.gather(1, by_head)
        top = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return values.gather(1, top), ids.gather(1, top)

    @torch.no_grad()
    def rank(self, hidden, window: Window, target) -> torch.Tensor:
        """(B,) int64 exact 1-based rank of ``target`` under the mixture, in ``topk``'s order
        (log-prob, then the head's log-prob, then lower id)."""
        log_g, log_1mg = self.log_gates(hidden, window)
        lp_all = self._head_ranking(hidden)
        ids = torch.cat([target[:, None], window.loc], dim=1)
        log_head = self._head_values(hidden, ids, lp_all)
        log_hist = torch.cat([window.log_p_of(target[:, None]), window.log_p], dim=1)
        mix = self._mix(log_g, log_1mg, log_hist, log_head)
        y_mix, w_mix = mix[:, :1], mix[:, 1:]
        y_head, w_head = log_head[:, :1], log_head[:, 1:]
        y = target[:, None]
        head_first = (w_head > y_head) | ((w_head == y_head) & (window.loc < y))
        # y's own positions never beat it (their value may differ from y_mix by rounding)
        beats_in_w = (
            window.first & (window.loc != y) & ((w_mix > y_mix) | ((w_mix == y_mix) & head_first))
        )
        rank = 1 + beats_in_w.sum(1)
        in_w = torch.isfinite(log_hist[:, 0])
        out_w = ~in_w
        if bool(out_w.any()):
            # outside W the mixture value is a monotone function of the head's, so with the
            # head's value as the tie-break the order there is the head's own
            rows = out_w.nonzero()[:, 0]
            if lp_all is None:
                head_rank = self.head.rank(hidden[rows], target[rows])
            else:
                head_rank = heads.rank_by_id(lp_all[rows], target[rows])
            beats = window.first[rows] & head_first[rows]
            rank[rows] += (head_rank - 1 - beats.sum(1)).clamp(min=0)
        if bool(in_w.any()):
            rows = in_w.nonzero()[:, 0]
            rank[rows] += self._count_outside_beating(
                rows, hidden, window, log_g, log_1mg, y_mix, y_head, target, lp_all
            )
        return rank

    def _count_outside_beating(
        self, rows, hidden, window: Window, log_g, log_1mg, y_mix, y_head, target, lp_all
    ) -> torch.Tensor:
        """(len(rows),) ``#{l outside W: l comes before the target}`` for the given rows of the
        batch, whose targets are inside W (the other arguments are the whole batch's).

        Outside W the mixture orders like the head, so the classes that beat y there are a
        prefix of the head's order. With a tree head on the CPU (``lp_all`` None) the head's
        exact top-k (the same bits as ``log_prob``) is grown, 4x at a time from
        ``_SEARCH_FIRST_K``, until its last class's mixture value is below ``log p(y)``: every
        class after it has a head value no higher, hence (the mixture value being monotone in
        the head's) a mixture value below ``log p(y)`` too. Rows still unresolved at
        ``_SEARCH_MAX_K`` classes score all V (O(V) per row), as every row of another head does.
        """

        def beating(r, lp, ids):  # (len(r), K): which of ``ids`` beat the target of rows r
            return self._outside_beating(
                window_rows(window, r),
                log_g[r],
                log_1mg[r],
                y_mix[r],
                y_head[r],
                target[r],
                lp,
                ids,
            )

        count = torch.zeros(rows.numel(), dtype=torch.long, device=hidden.device)
        todo = torch.arange(rows.numel(), device=hidden.device)  # positions in rows
        v = self.num_classes
        k = self._SEARCH_FIRST_K
        while lp_all is None and todo.numel() and k <= self._SEARCH_MAX_K:
            k = min(k, v)
            r = rows[todo]
            lp, ids = self.head.topk(hidden[r], k)
            above = beating(r, lp, ids)
            last_mix = self._mix(
                log_g[r], log_1mg[r], torch.full_like(lp[:, -1:], _NEG_INF), lp[:, -1:]
            )[:, 0]
            done = (last_mix < y_mix[r, 0]) | (k == v)
            count[todo[done]] = above.sum(1)[done]
            todo = todo[~done]
            k *= 4
        for s in range(0, todo.numel(), 256):
            part = todo[s : s + 256]
            r = rows[part]
            lp = lp_all[r] if lp_all is not None else self.head.ranking_log_prob_all(hidden[r])
            count[part] = beating(r, lp, torch.arange(v, device=lp.device).expand_as(lp)).sum(1)
        return count

    # the in-window rank's pruned search: first top-k size and the size past which a row
    # scores all V classes instead (class attributes, so a test can shrink them)
    _SEARCH_FIRST_K = 8
    _SEARCH_MAX_K = 2048

    def _outside_beating(self, window: Window, log_g, log_1mg, y_mix, y_head, target, lp, ids):
        """(B, K) bool: class ``ids`` (head log-prob ``lp``) lies outside the window and comes
        before the target (mixture value, then the head's value, then lower id)."""
        mix = self._mix(log_g, log_1mg, torch.full_like(lp, _NEG_INF), lp)
        first = (lp > y_head) | ((lp == y_head) & (ids < target[:, None]))
        above = (mix > y_mix) | ((mix == y_mix) & first)
        # membership in the window by binary search; invalid positions hold V, never an id
        loc = window.loc.masked_fill(~window.valid, self.num_classes).sort(1).values
        pos = torch.searchsorted(loc, ids.contiguous()).clamp(max=loc.shape[1] - 1)
        in_window = loc.gather(1, pos) == ids
        return above & ~in_window


def window_rows(window: Window, rows: torch.Tensor) -> Window:
    """The sub-window of the given rows."""
    return Window(*(getattr(window, f)[rows] for f in ("loc", "valid", "first", "score", "log_p")))


class HistoryLogitAdd(nn.Module):
    """The seed model's combination for a dense head: history scores added to the logits,
    ``log p = log_softmax(W h + b + s)`` with ``s_l = score(l)`` for l in the window, 0 elsewhere.

    Needs all V logits per row, so only a :class:`~hsoftmax.nn.DenseSoftmax` head is allowed.
    Because log-softmax is shift-invariant, ``head.log_prob_all(h) + s`` gives the same result as
    adding to the raw logits.
    """

    def __init__(self, head: nn.Module, scorer: HistoryScorer | None = None):
        super().__init__()
        if not getattr(head, "is_flat", False):
            raise ValueError(
                "history 'logit_add' needs the dense head (it adds scores to all V logits); use "
                f"history 'mixture' with {type(head).__name__}"
            )
        self.head = head
        self.scorer = scorer if scorer is not None else HistoryScorer()

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def logits(self, hidden, window: Window) -> torch.Tensor:
        """(B, V) head log-probs plus history scores (unnormalised)."""
        base = self.head.log_prob_all(hidden)
        # every position writes the score of its location (looked up by id, 0 if absent), so
        # repeated indices carry identical values and the scatter is deterministic
        bonus = torch.zeros_like(base).scatter(1, window.loc, window.score_of(window.loc))
        return base + bonus

    def forward(self, hidden, window, target, reduction="mean", label_smoothing=0.0):
        heads.check_label_smoothing(label_smoothing)
        return F.cross_entropy(
            self.logits(hidden, window),
            target,
            reduction=reduction,
            label_smoothing=float(label_smoothing),
        )

    def log_prob(self, hidden, window, target):
        return self.log_prob_all(hidden, window).gather(1, target[:, None])[:, 0]

    def log_prob_all(self, hidden, window):
        return self.logits(hidden, window).log_softmax(1)

    @torch.no_grad()
    def topk(self, hidden, window, k):
        heads.check_k(k)
        return heads.topk_by_id(self.log_prob_all(hidden, window), min(k, self.num_classes))

    @torch.no_grad()
    def rank(self, hidden, window, target):
        return heads.rank_by_id(self.log_prob_all(hidden, window), target)
