"""Next-location metrics as the MHSA protocol computes them (Hong et al., SIGSPATIAL 2022).

Inputs are per-sample exact ranks (1-based, over the FULL ranking of all V classes, as the heads'
``rank`` gives them) and the top-1 predictions. Dimension letter: N samples.

* ``acc@k = mean(rank <= k)`` for k in 1, 5, 10;
* ``mrr = mean(1 / rank)`` over the full ranking (no cut-off);
* ``ndcg@10 = mean(1 / log2(rank + 1) if rank <= 10 else 0)`` (one relevant item, so IDCG = 1);
* ``f1 = weighted F1 of the top-1 prediction`` (``sklearn.metrics.f1_score(y, top1,
  average="weighted")``: per-class F1 weighted by the class's support in ``y``).

All values are returned in percent, plus ``n`` (the number of samples). Deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["METRIC_NAMES", "format_table", "metrics_from_ranks", "per_user_metrics"]

METRIC_NAMES = ("acc@1", "acc@5", "acc@10", "mrr", "ndcg@10", "f1")


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def metrics_from_ranks(ranks, top1, y) -> dict[str, float]:
    """MHSA metrics (in %) of N samples.

    Args:
        ranks: (N,) 1-based rank of each target among all classes (1 = predicted first).
        top1: (N,) the top-1 predicted class of each sample.
        y: (N,) the target classes.

    Returns:
        ``{"acc@1", "acc@5", "acc@10", "mrr", "ndcg@10", "f1", "n"}``; NaN metrics for N = 0.
    """
    from sklearn.metrics import f1_score

    r = _np(ranks)
    if r.size and not np.all(r == np.round(r)):
        raise ValueError("ranks must be whole numbers (1-based positions)")
    r = r.astype(np.int64).reshape(-1)
    t1 = _np(top1).astype(np.int64).reshape(-1)
    yy = _np(y).astype(np.int64).reshape(-1)
    if not (r.shape == t1.shape == yy.shape):
        raise ValueError(
            f"ranks, top1 and y must have one shape (N,), got {r.shape}, {t1.shape}, {yy.shape}"
        )
    n = r.size
    if n == 0:
        return {**{k: float("nan") for k in METRIC_NAMES}, "n": 0}
    if r.min() < 1:
        raise ValueError(f"ranks are 1-based, got a rank of {int(r.min())}")
    if np.any((r == 1) != (t1 == yy)):
        i = int(np.flatnonzero((r == 1) != (t1 == yy))[0])
        raise ValueError(
            f"sample {i}: rank {int(r[i])} disagrees with top1 {int(t1[i])} vs target {int(yy[i])}"
        )
    ndcg = np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0)
    return {
        **_rank_metrics(r),
        "ndcg@10": 100.0 * float(np.mean(ndcg)),
        "f1": 100.0 * float(f1_score(yy, t1, average="weighted", zero_division=0)),
        "n": int(n),
    }


def _rank_metrics(rank: np.ndarray) -> dict[str, float]:
    """Acc@1/5/10 and MRR in % from 1-based ranks; a rank of 0 means "not ranked" (a miss with
    reciprocal rank 0, for truncated prediction lists)."""
    hit = rank >= 1
    rr = np.where(hit, 1.0 / np.maximum(rank, 1), 0.0)
    out = {f"acc@{k}": 100.0 * float(np.mean(hit & (rank <= k))) for k in (1, 5, 10)}
    return {**out, "mrr": 100.0 * float(np.mean(rr))}


def metrics_from_lists(preds: list[np.ndarray], y) -> dict[str, float]:
    """Acc@1/5/10 and MRR (in %) of truncated ranked prediction lists (one array of class ids
    per sample, best first): a target missing from its list counts as a miss with reciprocal
    rank 0. For baselines that rank only their top few classes."""
    yy = _np(y).astype(np.int64).reshape(-1)
    if len(preds) != yy.size:
        raise ValueError(f"{len(preds)} prediction lists for {yy.size} targets")
    rank = np.zeros(yy.size, dtype=np.int64)  # 1-based; 0 = not in the list
    for i, (p, t) in enumerate(zip(preds, yy, strict=True)):
        hit = np.flatnonzero(np.asarray(p) == t)
        if hit.size:
            rank[i] = hit[0] + 1
    if yy.size == 0:
        return {
            "acc@1": float("nan"),
            "acc@5": float("nan"),
            "acc@10": float("nan"),
            "mrr": float("nan"),
            "n": 0,
        }
    return {**_rank_metrics(rank), "n": int(yy.size)}


def per_user_metrics(ranks, top1, y, user):
    """One row of :func:`metrics_from_ranks` per user (column ``user``), sorted by user id: a
    pandas ``DataFrame``."""
    import pandas as pd

    r, t1, yy, u = (_np(a).reshape(-1) for a in (ranks, top1, y, user))
    rows = []
    for uid in np.unique(u):
        sel = u == uid
        rows.append({"user": int(uid), **metrics_from_ranks(r[sel], t1[sel], yy[sel])})
    columns = ["user", *METRIC_NAMES, "n"]
    return pd.DataFrame(rows, columns=columns)


def format_table(rows: dict[str, dict], digits: int = 2) -> str:
    """A Markdown table: one row per entry of ``rows`` (name -> metrics dict)."""
    head = "| | " + " | ".join(METRIC_NAMES) + " | n |"
    lines = [head, "|" + "---|" * (len(METRIC_NAMES) + 2)]
    for name, m in rows.items():
        cells = [f"{m[k]:.{digits}f}" for k in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['n']} |")
    return "\n".join(lines)
