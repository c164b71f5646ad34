"""The data a ``data`` config section names: a synthetic preset or a directory of real data
(trackintel staypoints or MHSA pickles, read by :func:`hsoftmax.data.load_dir`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from hsoftmax.data import MobilityData, load_dir, load_preset
from hsoftmax.data.samples import SampleSet

__all__ = ["keep_users", "load_data"]


def load_data(data_cfg: dict, progress: bool = True) -> MobilityData:
    """The samples named by a ``data`` config section: ``path`` (with ``previous_day``,
    ``min_history``, ``split``) or the synthetic ``preset``; with ``users`` only the samples of
    the first that many users (:func:`keep_users`)."""
    data = _load(data_cfg, progress)
    if data_cfg.get("users"):
        data = keep_users(data, int(data_cfg["users"]))
    return data


def keep_users(data: MobilityData, users: int) -> MobilityData:
    """``data`` with only the samples of users ``1 .. users`` in every split: a cheaper proxy of
    a data set with the same vocabulary (V, the tree, the head's cost) and the same per-user
    history density. The per-stay arrays are shared; only the sample index is cut."""
    return dataclasses.replace(
        data,
        train=_samples_of_users(data.train, users),
        validation=_samples_of_users(data.validation, users),
        test=_samples_of_users(data.test, users),
    )


def _samples_of_users(s: SampleSet, users: int) -> SampleSet:
    keep = np.flatnonzero(s.sample_user <= users)
    return dataclasses.replace(s, **{f: getattr(s, f)[keep] for f in SampleSet._SAMPLE_FIELDS})


def _load(data_cfg: dict, progress: bool) -> MobilityData:
    if data_cfg.get("path"):
        return load_dir(
            data_cfg["path"],
            previous_day=data_cfg.get("previous_day"),
            min_history=data_cfg.get("min_history"),
            split=data_cfg.get("split"),
            progress=progress,
        )
    return load_preset(
        data_cfg["preset"],
        seed=data_cfg["seed"],
        cache_dir=data_cfg["cache_dir"],
        progress=progress,
    )
