"""Using a trained run: :func:`load_run` (the model, ready to predict) and :func:`predict_run`
(``hsoftmax predict``: a CSV of every sample's top-k next locations in the data's original ids)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hsoftmax.data import MobilityData, MobilityDataset, collate
from hsoftmax.models import HistoryCentricModel, build_model

from .checkpoint import load_checkpoint
from .config import load_config
from .data import load_data
from .evaluate import to_device
from .rundir import CKPT

__all__ = ["load_run", "predict_run"]


def load_run(
    run_dir: str | os.PathLike,
    which: str = "best",
    data: MobilityData | None = None,
    device: str | torch.device = "cpu",
) -> HistoryCentricModel:
    """The model of a run directory with the weights of its ``best`` (or ``last``) epoch, in
    eval mode on ``device``; ``model.topk(batch, k)`` and ``model.rank(batch)`` take
    :func:`hsoftmax.data.collate` batches. ``data`` (default: the run's own, from its recorded
    absolute ``data.path`` or preset) sizes the model and builds its tree."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    cfg = load_config(run_dir / "config.yaml")
    ckpt = load_checkpoint(run_dir / CKPT)
    if data is None:
        data = load_data(cfg["data"], progress=False)
    model = build_model(cfg["model"], data)
    best = ckpt.get("best_model")
    model.load_state_dict(best if which == "best" and best is not None else ckpt["model"])
    return model.to(device).eval()


def _original(ids: np.ndarray, table: np.ndarray | None) -> np.ndarray:
    """Encoded ids -> the data's original ids (-1 for padding/unseen); unchanged without a map."""
    if table is None or len(table) == 0:
        return ids
    return np.asarray(table)[ids]


@torch.no_grad()
def predict_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    data_path: str | None = None,
    split: str = "test",
    k: int = 10,
    batch_size: int = 512,
    which: str = "best",
) -> Path:
    """Write ``out``: one row per sample of ``split`` with the user, the true next location and
    the top-``k`` locations with their probabilities, all in the data's original ids."""
    import pandas as pd

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    data_cfg = dict(cfg["data"], path=data_path) if data_path else cfg["data"]
    data = load_data(data_cfg, progress=False)
    model = load_run(run_dir, which=which, data=data)
    samples = data.splits[split]
    dataset = MobilityDataset(samples, max_len=cfg["data"]["max_len"])
    users, targets, tops, probs = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        batch = to_device(collate([dataset[i] for i in idx]), torch.device("cpu"))
        values, top = model.topk(batch, k)
        users.append(batch["user"].numpy())
        targets.append(batch["y"].numpy())
        tops.append(top.numpy())
        probs.append(values.double().exp().numpy())
    user_ids = getattr(data, "user_ids", None)
    loc_ids = getattr(data, "location_ids", None)
    top = _original(np.concatenate(tops), loc_ids)
    prob = np.concatenate(probs)
    frame = pd.DataFrame(
        {
            "user": _original(np.concatenate(users), user_ids),
            "target": _original(np.concatenate(targets), loc_ids),
            **{f"loc_{j + 1}": top[:, j] for j in range(top.shape[1])},
            **{f"p_{j + 1}": prob[:, j] for j in range(prob.shape[1])},
        }
    )
    out = Path(out)
    frame.to_csv(out, index=False, float_format="%.6g")
    return out
