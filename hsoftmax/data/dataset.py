"""``torch.utils.data.Dataset`` over next-location samples and a padding ``collate``.

A batch from :func:`collate` is a dict of tensors (B = batch size, L = longest history in the
batch; histories are right-padded):

========== ========= ======= ===============================================================
key        shape     dtype   content
========== ========= ======= ===============================================================
``x``      (B, L)    int64   history location ids (0 = padding, 1 = unseen in training)
``time``   (B, L)    int64   start time slot: ``start_min // 15`` in 0..95 (:data:`N_TIME_SLOTS`)
``weekday``(B, L)    int64   0 = Monday .. 6 = Sunday
``duration``(B, L)   int64   stay duration bucket ``min(dur_min // 30, 95)`` (:data:`N_DURATIONS`)
``diff``   (B, L)    int64   days between the history stay and the target day (0..previous_day)
``mask``   (B, L)    bool    True on real history entries (``arange(L) < lengths``)
``lengths``(B,)      int64   history length
``user``   (B,)      int64   user id (1..n_users-1)
``y``      (B,)      int64   target location id
========== ========= ======= ===============================================================

Padded positions hold 0 in every sequence tensor; use ``mask`` (0 is a valid time slot, weekday,
duration bucket and diff).  The 15-minute slot and 30-minute duration bucket are the defaults;
both widths are constructor arguments.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .samples import SampleSet, load_mhsa

__all__ = [
    "CONTEXT_SLOT_MINUTES",
    "MobilityDataset",
    "N_CONTEXTS",
    "N_CONTEXT_SLOTS",
    "N_DURATIONS",
    "N_TIME_SLOTS",
    "N_WEEKDAYS",
    "batch_context",
    "collate",
    "context_id",
    "sample_context",
]

TIME_SLOT_MINUTES = 15
DURATION_BUCKET_MINUTES = 30
N_TIME_SLOTS = 24 * 60 // TIME_SLOT_MINUTES  # 96
N_DURATIONS = 96  # 30-minute buckets up to 2 days (MHSA clips stays at 2 days - 1 minute)
N_WEEKDAYS = 7
_SEQ = ("x", "time", "weekday", "duration", "diff")
# the prediction context: the target day's weekday x the two-hour slot in which the last stay ends
CONTEXT_SLOT_MINUTES = 120
N_CONTEXT_SLOTS = 24 * 60 // CONTEXT_SLOT_MINUTES  # 12
N_CONTEXTS = N_WEEKDAYS * N_CONTEXT_SLOTS  # 84


def context_id(time, duration, weekday, diff):
    """Prediction context ``target weekday * 12 + two-hour slot of the last stay's end`` (0..83)
    from the last history stay's features as a batch holds them: start ``time`` slot, ``duration``
    bucket (its middle is taken), ``weekday`` and ``diff`` (days before the target day). Works on
    numpy arrays and torch tensors alike, so training tables and batches share one definition."""
    end_min = (
        time * TIME_SLOT_MINUTES + duration * DURATION_BUCKET_MINUTES + DURATION_BUCKET_MINUTES // 2
    )
    return ((weekday + diff) % N_WEEKDAYS) * N_CONTEXT_SLOTS + (end_min % 1440) // (
        CONTEXT_SLOT_MINUTES
    )


def batch_context(batch: dict) -> torch.Tensor:
    """(B,) :func:`context_id` of each row of a :func:`collate` batch (its last real stay)."""
    last = (batch["mask"].sum(1) - 1).clamp(min=0)[:, None]
    at = {k: batch[k].gather(1, last)[:, 0] for k in ("time", "duration", "weekday", "diff")}
    return context_id(at["time"], at["duration"], at["weekday"], at["diff"])


def sample_context(samples: SampleSet) -> np.ndarray:
    """(N,) :func:`context_id` of every sample, from the same buckets :class:`MobilityDataset`
    and :func:`collate` give a batch (default widths)."""
    last = np.asarray(samples.hist_end, dtype=np.int64) - 1
    time = np.asarray(samples.start_min, dtype=np.int64)[last] // TIME_SLOT_MINUTES
    dur = np.minimum(
        np.asarray(samples.dur, dtype=np.int64)[last] // DURATION_BUCKET_MINUTES, N_DURATIONS - 1
    )
    weekday = np.asarray(samples.weekday, dtype=np.int64)[last]
    diff = np.asarray(samples.target_day, dtype=np.int64) - np.asarray(samples.day)[last]
    return context_id(time, dur, weekday, diff)


class MobilityDataset(Dataset):
    """Samples of one split as a map-style dataset; use with ``collate``.

    Args:
        samples: a :class:`~hsoftmax.data.samples.SampleSet`, an MHSA list of dicts, or the path
            of an MHSA pickle (validated on load).
        max_len: keep only the most recent ``max_len`` history stays (None: keep all).
        time_slot_minutes: width of a start-time slot (default 15 -> 96 slots).
        duration_bucket_minutes: width of a duration bucket (default 30); buckets are clipped to
            ``n_durations - 1``.
        n_durations: number of duration buckets (default 96).

    ``dataset[i]`` is a dict of numpy arrays ``x, time, weekday, duration, diff`` (history length)
    and ints ``user, y``.
    """

    def __init__(
        self,
        samples: SampleSet | list | str | os.PathLike,
        max_len: int | None = None,
        time_slot_minutes: int = TIME_SLOT_MINUTES,
        duration_bucket_minutes: int = DURATION_BUCKET_MINUTES,
        n_durations: int = N_DURATIONS,
    ):
        if isinstance(samples, str | os.PathLike):
            samples = load_mhsa(samples, as_sampleset=True)
        elif not isinstance(samples, SampleSet):
            samples = SampleSet.from_mhsa(samples)
        s = samples
        self.samples = s
        # precompute per-stay features once so that __getitem__ is only slicing
        self._loc = s.loc.astype(np.int64)
        self._time = s.start_min.astype(np.int64) // time_slot_minutes
        self._weekday = s.weekday.astype(np.int64)
        self._dur = np.minimum(s.dur.astype(np.int64) // duration_bucket_minutes, n_durations - 1)
        self._day = s.day.astype(np.int64)
        self._start = s.hist_start.astype(np.int64)
        if max_len is not None:
            self._start = np.maximum(self._start, s.hist_end - max_len)
        self._end = s.hist_end.astype(np.int64)
        self._tday = s.target_day.astype(np.int64)
        self._user = s.sample_user.astype(np.int64)
        self._y = s.y.astype(np.int64)

    def __len__(self) -> int:
        return len(self._y)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) history length of each sample as ``dataset[i]`` gives it (after ``max_len``)."""
        return self._end - self._start

    def __getitem__(self, i: int) -> dict:
        a, b = self._start[i], self._end[i]
        return {
            "x": self._loc[a:b],
            "time": self._time[a:b],
            "weekday": self._weekday[a:b],
            "duration": self._dur[a:b],
            "diff": self._tday[i] - self._day[a:b],
            "user": self._user[i],
            "y": self._y[i],
        }


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`MobilityDataset` items into the batch dict described above."""
    lengths = np.fromiter((len(b["x"]) for b in batch), dtype=np.int64, count=len(batch))
    L = int(lengths.max()) if len(batch) else 0
    mask = np.arange(L)[None, :] < lengths[:, None]
    out: dict[str, torch.Tensor] = {}
    for key in _SEQ:
        padded = np.zeros((len(batch), L), dtype=np.int64)
        # row-major boolean assignment fills each row's first `length` entries in order
        padded[mask] = np.concatenate([b[key] for b in batch]) if len(batch) else []
        out[key] = torch.from_numpy(padded)
    out["mask"] = torch.from_numpy(mask)
    out["lengths"] = torch.from_numpy(lengths)
    out["user"] = torch.as_tensor(np.array([b["user"] for b in batch], dtype=np.int64))
    out["y"] = torch.as_tensor(np.array([b["y"] for b in batch], dtype=np.int64))
    return out
