"""Time the history mixture's exact ``rank`` on a trained run, with the in-window search
(the head's grown top-k) against scoring all V classes for in-window targets, and check that
both give the same ranks.

    python experiments/mixture_rank_time.py \
        experiments/results/diy/runs/hs-kmeans128+mixture+nodes-seed1 \
        --samples 2048 --threads 1

Needs the run's ``ckpt.pt`` (not committed) and a mixture model (``model.history=mixture``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hsoftmax.data import MobilityDataset, collate
from hsoftmax.models import build_model
from hsoftmax.models.history import HistoryMixture
from hsoftmax.training import load_checkpoint, load_data
from hsoftmax.training.config import load_config
from hsoftmax.training.evaluate import to_device as _to


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--samples", type=int, default=2048, help="first N test samples")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per method")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.run_dir / "config.yaml")
    data = load_data(cfg["data"], progress=False)
    model = build_model(cfg["model"], data)
    ckpt = load_checkpoint(args.run_dir / "ckpt.pt")
    model.load_state_dict(ckpt["best_model"] or ckpt["model"])
    model.eval()
    if not isinstance(model.output, HistoryMixture):
        raise SystemExit(f"{args.run_dir}: not a history-mixture model")
    ds = MobilityDataset(data.test, max_len=cfg["data"]["max_len"])
    n = min(args.samples, len(ds))
    batches, in_window = [], 0
    with torch.no_grad():
        for s in range(0, n, args.batch_size):
            batch = _to(collate([ds[i] for i in range(s, min(s + args.batch_size, n))]), "cpu")
            hidden, window = model.hidden_and_window(batch)
            y = batch["y"]
            in_window += int(torch.isfinite(window.log_p_of(y[:, None])[:, 0]).sum())
            batches.append((hidden, window, y))

    def run(max_k: int) -> tuple[float, torch.Tensor]:
        old = HistoryMixture._SEARCH_MAX_K
        HistoryMixture._SEARCH_MAX_K = max_k
        try:
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                ranks = [model.output.rank(h, w, y) for h, w, y in batches]
                best = min(best, time.perf_counter() - t)
        finally:
            HistoryMixture._SEARCH_MAX_K = old
        return best, torch.cat(ranks)

    t_full, r_full = run(0)  # max 0: every in-window row scores all V classes
    t_search, r_search = run(HistoryMixture._SEARCH_MAX_K)
    same = torch.equal(r_full, r_search)
    print(f"{n} test samples, {in_window} targets in their window, {args.threads} thread(s)")
    print(f"rank, all V classes for in-window targets: {t_full:.3f} s")
    print(f"rank, in-window search (top-k from {HistoryMixture._SEARCH_FIRST_K}): {t_search:.3f} s")
    print(f"speed-up {t_full / t_search:.2f}x; ranks identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
