"""Evaluating a seed ensemble of finished runs (``hsoftmax evaluate RUN_DIR RUN_DIR ...``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hsoftmax.data import MobilityDataset
from hsoftmax.metrics import format_table
from hsoftmax.models import Ensemble

from .checkpoint import atomic_write_text
from .config import load_config
from .data import load_data
from .evaluate import evaluate_model
from .predict import load_run

__all__ = ["evaluate_ensemble"]


def evaluate_ensemble(
    run_dirs: list[str | os.PathLike],
    split: str = "test",
    which: str = "best",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    echo=print,
) -> dict:
    """Metrics of the probability-level ensemble (:class:`~hsoftmax.models.Ensemble`) of the
    runs' ``which`` checkpoints on ``split``: exact top-k and ranks over all classes.

    The runs must have been trained on the same data (their ``data`` config sections equal);
    the first run's evaluation settings are used. Returns the metrics with ``nll``,
    ``members`` and ``parameters`` (the members' total); ``out``: also written there as JSON.
    """
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError(f"an ensemble needs at least 2 run directories, got {len(dirs)}")
    cfgs = [load_config(d / "config.yaml") for d in dirs]
    for d, cfg in zip(dirs[1:], cfgs[1:], strict=True):
        if cfg["data"] != cfgs[0]["data"]:
            raise ValueError(
                f"{d} was trained on other data than {dirs[0]} (their data sections differ); "
                "an ensemble's members must share the data and its classes"
            )
    cfg = cfgs[0]
    data = load_data(cfg["data"], progress=False)
    models = [load_run(d, which=which, data=data) for d in dirs]
    ensemble = Ensemble(models)
    samples = {"train": data.train, "validation": data.validation, "test": data.test}[split]
    res = evaluate_model(
        ensemble,
        MobilityDataset(samples, max_len=cfg["data"]["max_len"]),
        cfg["train"]["eval_batch_size"],
        torch.device("cpu"),
        float(cfg["train"]["label_smoothing"]),
        progress=progress,
        desc=f"{split} (ensemble of {len(models)})",
    )
    params = sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)
    result = {
        **res["metrics"],
        "nll": res["nll"],
        "members": [str(d) for d in dirs],
        "parameters": params,
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=2) + "\n")
    echo(format_table({f"{split} (ensemble of {len(models)}, {params:,} parameters)": result}))
    return result
