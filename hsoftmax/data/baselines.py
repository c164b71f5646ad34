"""Simple next-location baselines on MHSA samples, with Acc@k and MRR.

All baselines are fitted on the training samples only: each training sample contributes the
transition ``last history location -> target`` of its user (every training stay that is a target),
and its target counts as one visit.

* ``most_frequent``: the user's locations ranked by training visits; then global popularity.
* ``markov``: first-order Markov chain, user-specific (``user, last location -> next``); backs off
  to the global chain (``last location -> next``), then global popularity.  Ranked by count,
  ties by smaller id.
* ``history_frequency`` (diagnostic): the locations of the sample's own history window ranked by
  frequency, ties by recency; then the Markov ranking.
* ``context_markov`` (diagnostic): the Markov chain additionally conditioned on the target's
  weekday and on the two-hour slot in which the last stay ends, backing off to weekend-or-not and
  a four-hour slot, then to ``markov`` (contexts seen fewer than 3 times in training count as
  unseen).  It only uses features a learned model sees, so the gap between it and
  ``markov`` is a lower bound on the time-dependent structure left for a model to learn.

Ranked lists are cut at :data:`TOP_K` = 100 entries; MRR counts a target ranked lower as 0 (this
changes MRR by less than 1/100).
"""

from __future__ import annotations

import numpy as np

from hsoftmax.metrics import metrics_from_lists

from .samples import SampleSet

__all__ = ["BASELINES", "TOP_K", "predict", "run_baselines"]

TOP_K = 100
_CONTEXT_MIN = 3  # a context seen fewer times in training backs off to the plain Markov chain
BASELINES = ("most_frequent", "markov", "history_frequency", "context_markov")


class _CountTable:
    """Ranked successor lists per integer key: ``lookup(key) -> locations by count``."""

    def __init__(self, keys: np.ndarray, y: np.ndarray, vocab: int, min_total: int = 1):
        pair = keys.astype(np.int64) * vocab + y
        up, counts = np.unique(pair, return_counts=True)
        pk, py = up // vocab, up % vocab
        o = np.lexsort((py, -counts, pk))
        self.py = py[o]
        self.keys, self.starts = np.unique(pk[o], return_index=True)
        self.ends = np.append(self.starts[1:], len(o))
        totals = np.add.reduceat(counts[o], self.starts) if len(o) else np.zeros(0, np.int64)
        # keys seen too rarely are treated as unseen (back off to the next level)
        self.usable = totals >= min_total

    def slices(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (start, end) into ``self.py`` for every query key; empty when absent."""
        if len(self.keys) == 0:
            z = np.zeros(len(q), dtype=np.int64)
            return z, z
        pos = np.searchsorted(self.keys, q).clip(0, len(self.keys) - 1)
        found = (self.keys[pos] == q) & self.usable[pos]
        s = np.where(found, self.starts[pos], 0)
        e = np.where(found, np.minimum(self.ends[pos], self.starts[pos] + TOP_K), 0)
        return s, e


def _context(s: SampleSet) -> tuple[np.ndarray, np.ndarray]:
    """(weekday of the target day, two-hour slot of the end of the last stay) per sample."""
    last = s.hist_end - 1
    target_wd = (s.weekday[last].astype(np.int64) + (s.target_day - s.day[last])) % 7
    end_min = s.start_min[last].astype(np.int64) + s.dur[last].astype(np.int64)
    return target_wd, (end_min % 1440) // 120


def _merge(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate candidate lists, keep first occurrences, cut at TOP_K."""
    out = dict.fromkeys(int(v) for p in parts for v in p)
    return np.fromiter(out, dtype=np.int64, count=len(out))[:TOP_K]


def predict(name: str, train: SampleSet, test: SampleSet, n_locations: int) -> list[np.ndarray]:
    """Ranked predictions (up to :data:`TOP_K` location ids) of baseline ``name`` per test sample.

    Args:
        name: one of :data:`BASELINES`.
        train: training samples the baseline is fitted on.
        test: samples to predict.
        n_locations: vocabulary size ``V``.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    V = n_locations
    tu, tl, ty = train.sample_user, train.last_loc, train.y
    qu, ql = test.sample_user, test.last_loc
    pop = np.argsort(-np.bincount(ty, minlength=V), kind="stable")[:TOP_K]
    pop = pop[pop >= 1]  # never predict padding
    tables: list[tuple[_CountTable, np.ndarray]] = []
    if name == "most_frequent":
        tables.append((_CountTable(tu, ty, V), qu))
    else:
        if name == "context_markov":
            tw, th = _context(train)
            qw, qh = _context(test)
            # weekday x 2-hour slot, then weekend flag x 4-hour slot
            k_tr = ((tu * V + tl) * 7 + tw) * 12 + th
            k_te = ((qu * V + ql) * 7 + qw) * 12 + qh
            tables.append((_CountTable(k_tr, ty, V, min_total=_CONTEXT_MIN), k_te))
            k_tr = ((tu * V + tl) * 2 + (tw >= 5)) * 6 + th // 2
            k_te = ((qu * V + ql) * 2 + (qw >= 5)) * 6 + qh // 2
            tables.append((_CountTable(k_tr, ty, V, min_total=_CONTEXT_MIN), k_te))
        tables.append((_CountTable(tu * V + tl, ty, V), qu * V + ql))
        tables.append((_CountTable(tl, ty, V), ql))
    bounds = [(t, *t.slices(q)) for t, q in tables]
    preds = []
    for i in range(len(test)):
        parts = []
        if name == "history_frequency":
            x = test.loc[test.hist_start[i] : test.hist_end[i]]
            vals, first_rev, counts = np.unique(x[::-1], return_index=True, return_counts=True)
            # frequency first, then recency (smaller index in the reversed history)
            parts.append(vals[np.lexsort((first_rev, -counts))])
        for t, s, e in bounds:
            parts.append(t.py[s[i] : e[i]])
        parts.append(pop)
        preds.append(_merge(parts))
    return preds


def run_baselines(
    train: SampleSet,
    test: SampleSet,
    n_locations: int,
    names: tuple[str, ...] = BASELINES,
) -> dict[str, dict[str, float]]:
    """Fit every baseline in ``names`` on ``train`` and evaluate on ``test``.

    Returns ``{name: {"acc@1", "acc@5", "acc@10", "mrr", "n"}}`` with metrics in %.
    """
    return {
        name: metrics_from_lists(predict(name, train, test, n_locations), test.y) for name in names
    }
