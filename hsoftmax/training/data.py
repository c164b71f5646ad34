"""The data a ``data`` config section names: a synthetic preset or a directory of real data
(trackintel staypoints or MHSA pickles, read by :func:`hsoftmax.data.load_dir`)."""

from __future__ import annotations

from hsoftmax.data import MobilityData, load_dir, load_preset

__all__ = ["load_data"]


def load_data(data_cfg: dict, progress: bool = True) -> MobilityData:
    """The samples named by a ``data`` config section: ``path`` (with ``previous_day``,
    ``min_history``, ``split``) or the synthetic ``preset``."""
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
