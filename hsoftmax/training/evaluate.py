"""Evaluation: loss, exact ranks and top-k of a model over a data set; a run's test; re-evaluation
of a finished run (``hsoftmax evaluate``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from hsoftmax.data import MobilityDataset, collate
from hsoftmax.metrics import format_table, metrics_from_ranks, per_user_metrics
from hsoftmax.models import build_model

from .checkpoint import atomic_write_text, load_checkpoint
from .config import load_config
from .data import load_data
from .rundir import CKPT, FINISHED

__all__ = ["evaluate_model", "evaluate_run", "final_test", "to_device"]


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    batch_size: int,
    device,
    label_smoothing: float = 0.0,
    metrics: bool = True,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Loss and (if ``metrics``) exact ranks/top-10 of a model over a dataset, in order.

    Returns ``{"loss", "nll", "metrics", "ranks", "top", "y", "user"}`` (``loss`` label-smoothed,
    ``nll`` the plain negative log-likelihood, both means over samples).
    """
    from tqdm.auto import tqdm

    model.eval()
    n = len(dataset)
    loss_sum = nll_sum = 0.0
    ranks, tops, ys, users = [], [], [], []
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, leave=False, disable=not progress, unit="batch"):
        batch = to_device(collate([dataset[i] for i in range(s, min(s + batch_size, n))]), device)
        if metrics:
            loss, nll, top, rank = model.evaluate_batch(batch, 10, label_smoothing)
            ranks.append(rank.cpu())
            tops.append(top[:, 0].cpu())
        else:
            loss, nll = model.loss_and_nll(batch, label_smoothing)
        loss_sum += float(loss)
        nll_sum += float(nll)
        ys.append(batch["y"].cpu())
        users.append(batch["user"].cpu())
    out = {"loss": loss_sum / max(n, 1), "nll": nll_sum / max(n, 1)}
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
    out["y"], out["user"] = y, torch.cat(users) if users else y
    if metrics:
        out["ranks"], out["top"] = torch.cat(ranks), torch.cat(tops)
        out["metrics"] = metrics_from_ranks(out["ranks"], out["top"], y)
    return out


def final_test(
    model, test_set, cfg: dict, device, run_dir: Path, progress: bool, user_ids=None
) -> dict:
    """Test the (best) model; write ``test_table.md``, ``per_user.csv`` and, last,
    ``test_metrics.json``."""
    tcfg = cfg["train"]
    res = evaluate_model(
        model,
        test_set,
        tcfg["eval_batch_size"],
        device,
        float(tcfg["label_smoothing"]),
        progress=progress,
        desc="test",
    )
    test = {**res["metrics"], "nll": res["nll"]}
    atomic_write_text(run_dir / "test_table.md", format_table({"test": test}) + "\n")
    per_user = per_user_metrics(res["ranks"], res["top"], res["y"], res["user"])
    if user_ids is not None and len(user_ids):  # the data's original user ids
        per_user["user"] = np.asarray(user_ids)[per_user["user"].to_numpy()]
    atomic_write_text(
        run_dir / "per_user.csv",
        per_user.to_csv(index=False, float_format="%.4f", lineterminator="\n"),
    )
    # last: its presence marks a finished run (compare_heads --reuse, a fresh run's refusal)
    atomic_write_text(run_dir / FINISHED, json.dumps(test, indent=2) + "\n")
    return test


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    which: str = "best",
    overrides: list[str] | None = None,
    echo=print,
) -> dict:
    """Re-evaluate a run's checkpoint (``which``: ``best`` or ``last`` epoch) on a split;
    writes ``<split>_metrics_eval.json`` and returns the metrics."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    ckpt = load_checkpoint(run_dir / CKPT)
    device = torch.device(cfg["train"]["device"])
    data = load_data(cfg["data"], progress=bool(cfg["train"]["progress"]))
    model = build_model(cfg["model"], data)
    state = (
        ckpt["best_model"] if which == "best" and ckpt["best_model"] is not None else ckpt["model"]
    )
    model.load_state_dict(state)
    model.to(device)
    samples = {"train": data.train, "validation": data.validation, "test": data.test}[split]
    res = evaluate_model(
        model,
        MobilityDataset(samples, max_len=cfg["data"]["max_len"]),
        cfg["train"]["eval_batch_size"],
        device,
        float(cfg["train"]["label_smoothing"]),
        progress=bool(cfg["train"]["progress"]),
        desc=split,
    )
    out = {**res["metrics"], "nll": res["nll"]}
    atomic_write_text(run_dir / f"{split}_metrics_eval.json", json.dumps(out, indent=2) + "\n")
    echo(format_table({f"{split} ({which})": out}))
    return out
