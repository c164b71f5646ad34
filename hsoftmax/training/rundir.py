"""The run directory: where a run's config, checkpoint, metrics and figures live.

``<output.dir>/<name>-<timestamp>/`` (or ``output.run_dir``) holds ``config.yaml``,
``params.json``, ``ckpt.pt`` (atomic, every epoch), ``metrics.csv``/``metrics.json`` (one row an
epoch), ``curves.png``, and after the test ``test_table.md``, ``per_user.csv`` and, last,
``test_metrics.json`` (its presence marks a finished run).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import yaml

from .checkpoint import atomic_write_text

__all__ = ["CKPT", "FINISHED", "new_run_dir", "plot_history", "write_history", "write_run_info"]

CKPT = "ckpt.pt"
FINISHED = "test_metrics.json"


def new_run_dir(cfg: dict) -> Path:
    """A fresh directory name for a new run (not created)."""
    if cfg["output"]["run_dir"]:
        return Path(cfg["output"]["run_dir"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg["output"]["dir"]) / f"{cfg['name']}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def write_run_info(run_dir: Path, cfg: dict, params: dict) -> None:
    """Create ``run_dir`` and write its ``config.yaml`` and ``params.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(run_dir / "params.json", json.dumps(params, indent=2) + "\n")


def write_history(run_dir: Path, history: list[dict]) -> None:
    """``metrics.csv`` and ``metrics.json``: one row per epoch."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = run_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(history, indent=2) + "\n")
    os.replace(tmp, run_dir / "metrics.json")


def plot_history(run_dir: Path, history: list[dict]) -> None:
    """``curves.png``: losses and validation metrics per epoch."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss (smoothed)")
    a.plot(ep, [r["val_nll"] for r in history], "o-", label="validation NLL")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["train_seconds"] for r in history], "o-", label="train s/epoch")
    b.set_ylabel("seconds")
    for key in ("val_acc@1", "val_acc@5", "val_acc@10", "val_mrr"):
        if key in history[0]:
            if key == "val_acc@1":
                b.cla()
                b.set_ylabel("validation %")
            b.plot(ep, [r[key] for r in history], "o-", label=key[4:])
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
