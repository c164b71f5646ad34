"""One training step of the seed model as the vocabulary grows: V = 15,584 .. 1,000,000.

    python experiments/scale_step.py --out experiments/results/scale_step.json

For each V and configuration, a fresh process builds the seed model (``configs/diy.yaml``: loc 48,
d_model 112, 4 layers, history mixture, label smoothing 0) with V location classes and times
training steps (forward, backward, gradient clipping, optimizer) on batches of 256 real
``small``-preset histories whose location ids are spread over the V classes by a fixed random map
(so a step touches as many distinct rows as real data does). Configurations:

* ``dense``: ``DenseSoftmax`` head, dense location embedding, ``torch.optim.AdamW``;
* ``hs-adamw``: ``HierarchicalSoftmax`` (128-ary balanced tree), dense gradients, AdamW;
* ``hs-sparse``: the same head with ``model.sparse`` (row-sparse embedding and head gradients)
  and :class:`hsoftmax.optim.SparseAdamW`.

Reported per step: CPU seconds of the process (``time.process_time``: robust when other jobs
share the cores, unlike wall time) and wall seconds, medians over ``--steps``; and the peak
resident memory of the process. Ratios against V = 15,584 of the same configuration are computed
from one run of this script; quote them with the CPU named (``lscpu``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

CONFIGS = ("dense", "hs-adamw", "hs-sparse")
SIZES = (15_584, 100_000, 1_000_000)


def _one(v: int, config: str, steps: int, threads: int) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from hsoftmax import Tree
    from hsoftmax.data import MobilityDataset, load_preset
    from hsoftmax.models import build_model
    from hsoftmax.training import load_config, make_optimizer, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides = ["train.label_smoothing=0", "model.dropout=0.2"]
    if config == "dense":
        overrides += ["model.head=dense"]
    if config == "hs-sparse":
        overrides += ["model.sparse=true", "train.optimizer=sparse_adamw"]
    cfg = load_config("diy", overrides)
    small = load_preset("small", seed=0, progress=False)
    rng = np.random.default_rng(0)
    spread = np.concatenate([[0, 1], 2 + rng.permutation(v - 2)[: small.n_locations - 2]])
    samples = small.train
    samples.loc[:] = spread[samples.loc]
    samples.y[:] = spread[samples.y]
    data = SimpleNamespace(
        n_locations=v, n_users=small.n_users, locations=pd.DataFrame(), train=samples
    )
    tree = Tree.balanced(v, 128) if config != "dense" else None
    t0 = time.perf_counter()
    model = build_model(cfg["model"], data, tree=tree)
    build_seconds = time.perf_counter() - t0
    optimizer = make_optimizer(model, cfg["train"])
    dataset = MobilityDataset(samples)
    batches = [list(range(i * 256, (i + 1) * 256)) for i in range(steps + 2)]
    cpu, wall = [], []
    model.train()
    for i, idx in enumerate(batches):
        c0, w0 = time.process_time(), time.perf_counter()
        train_step(model, model, optimizer, dataset, idx, torch.device("cpu"), cfg["train"])
        if i >= 2:  # two warm-up steps (first-touch allocation of the optimizer state)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return {
        "V": v,
        "config": config,
        "cpu_s": statistics.median(cpu),
        "wall_s": statistics.median(wall),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": build_seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--one", nargs=2, metavar=("V", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--plot", type=Path, help="draw CPU s/step and peak memory against V here")
    p.add_argument(
        "--from-json", type=Path, help="train nothing: plot the rows of an earlier --out file"
    )
    args = p.parse_args()
    if args.from_json:
        if args.plot is None:
            p.error("--from-json needs --plot")
        _plot(json.loads(args.from_json.read_text()), args.plot)
        return
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.steps, args.threads)))
        return
    rows = []
    for config in args.configs:
        for v in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(v), config]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                row = {"V": v, "config": config, "error": res.stderr.strip().splitlines()[-1]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["config"]: r for r in rows if r["V"] == min(args.sizes) and "cpu_s" in r}
    print(f"\n| config | V | CPU s/step | x V={min(args.sizes):,} | wall s/step | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "cpu_s" not in r:
            print(f"| {r['config']} | {r['V']:,} | {r['error']} | | | |")
            continue
        ratio = r["cpu_s"] / base[r["config"]]["cpu_s"] if r["config"] in base else float("nan")
        print(
            f"| {r['config']} | {r['V']:,} | {r['cpu_s']:.3f} | {ratio:.2f} | {r['wall_s']:.3f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows: list[dict], path: Path) -> None:
    """CPU seconds per step and peak resident memory against V, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.4))
    for config in CONFIGS:
        mine = sorted(
            (r for r in rows if r["config"] == config and "cpu_s" in r), key=lambda r: r["V"]
        )
        if mine:
            vs = [r["V"] for r in mine]
            ax_t.plot(vs, [r["cpu_s"] for r in mine], marker="o", label=config)
            ax_m.plot(vs, [r["peak_rss_mb"] / 1024 for r in mine], marker="o", label=config)
    for ax, label in ((ax_t, "CPU s per training step"), (ax_m, "peak resident memory (GB)")):
        ax.set_xscale("log")
        ax.set_xlabel("V (locations)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle("seed model, one training step (batch 256, 1 thread)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
