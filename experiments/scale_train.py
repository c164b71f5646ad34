"""A short training run of the seed model at V ~ 100K: the ``diy-100k`` preset, row-sparse.

    python experiments/scale_train.py --cache-dir ~/.cache/hsoftmax/data \
        --out experiments/results/scale_train.json

The seed configuration (``configs/diy.yaml``: k-means tree of 128 clusters, history mixture) with
``model.sparse=true``, ``train.optimizer=sparse_adamw`` and no label smoothing, trained for
``--epochs`` epochs of ``--steps`` batches of 256 (a short run, not to convergence).  Reported: the
validation NLL of the untrained model and after each epoch, the test metrics of the best epoch,
and the most-frequent-location baseline (:func:`hsoftmax.data.run_baselines`) on the same test
split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hsoftmax.data import MobilityDataset, load_preset, run_baselines
from hsoftmax.models import build_model
from hsoftmax.training import evaluate_model, load_config, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="diy-100k")
    ap.add_argument("--cache-dir", help="preset cache (default: hsoftmax's)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="batches per epoch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    data = load_preset(args.preset, seed=0, cache_dir=args.cache_dir, progress=False)
    with tempfile.TemporaryDirectory(prefix="hsoftmax-scale-train-") as out_dir:
        cfg = load_config(
            "diy",
            [
                f"data.preset={args.preset}",
                f"output.dir={out_dir}",
                f"train.epochs={args.epochs}",
                f"train.max_steps_per_epoch={args.steps}",
                f"train.num_threads={args.threads}",
                "train.progress=false",
                "train.allow_over_budget=true",  # V x 160 embedding and head rows
                "train.optimizer=sparse_adamw",
                "model.sparse=true",
                "train.label_smoothing=0",  # smoothing over leaves scores every row (dense)
            ],
        )
        torch.manual_seed(cfg["train"]["seed"])
        untrained = build_model(cfg["model"], data)
        before = evaluate_model(untrained, MobilityDataset(data.validation), 512, "cpu")
        t0 = time.perf_counter()
        result = train(cfg, data=data)
        seconds = time.perf_counter() - t0
    baseline = run_baselines(data.train, data.test, data.n_locations, ("most_frequent",))
    out = {
        "preset": args.preset,
        "V": data.n_locations,
        "samples": {k: len(v) for k, v in data.splits.items()},
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "batch_size": cfg["train"]["batch_size"],
        "threads": args.threads,
        "params": result.params,
        "val_nll_untrained": before["nll"],
        "val_nll": [row["val_nll"] for row in result.history],
        "val_acc@1": [row.get("val_acc@1") for row in result.history],
        "train_seconds": [row["train_seconds"] for row in result.history],
        "total_seconds": seconds,
        "test": result.test,
        "most_frequent_test": baseline["most_frequent"],
        "peak_rss_mb": result.history[-1]["peak_rss_mb"],
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
