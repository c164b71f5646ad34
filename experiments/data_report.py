"""Print the data figures of the README: generation time, sample counts, vocabulary, baselines and
data-loading throughput for the synthetic presets.

    python experiments/data_report.py                      # all presets, seed 0
    python experiments/data_report.py --presets diy --seed 1

Every figure is measured by this run (nothing is cached between runs unless --cache-dir is given,
in which case generation time is the cached run's).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from hsoftmax.data.baselines import run_baselines
from hsoftmax.data.dataset import MobilityDataset, collate
from hsoftmax.data.samples import load_preset


def _loader_throughput(data, batch_size: int) -> tuple[float, float]:
    """One shuffled epoch over the training split: (samples/s, ms per batch)."""
    ds = MobilityDataset(data.train)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate)
    t0 = time.perf_counter()
    n_batches = 0
    for _ in loader:
        n_batches += 1
    dt = time.perf_counter() - t0
    return len(ds) / dt, 1000 * dt / n_batches


def _reference_step_ms(n_locations: int, batch: dict, hidden: int = 128, reps: int = 5) -> float:
    """Time of a deliberately minimal training step (mean-pooled embeddings, full-softmax linear
    head, cross entropy, backward, SGD) on one batch: a lower bound on any real model's step."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(n_locations, hidden, padding_idx=0)
    head = torch.nn.Linear(hidden, n_locations)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    mask = batch["mask"].unsqueeze(-1).float()

    def step():
        h = (emb(batch["x"]) * mask).sum(1) / mask.sum(1)
        loss = torch.nn.functional.cross_entropy(head(h), batch["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return 1000 * (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "geolife", "diy"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="reuse/keep generated data here (default: a temp dir)")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed {args.seed}\n"
    )
    tmp = None
    cache = args.cache_dir
    if cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="hsoftmax-data-report-")
        cache = tmp.name
    rows, base_rows, load_rows = [], [], []
    for name in args.presets:
        t0 = time.perf_counter()
        data = load_preset(name, seed=args.seed, cache_dir=cache, progress=False)
        total = time.perf_counter() - t0
        n = data.info["n_samples"]
        rows.append(
            f"| {name} | {data.info['n_users_in']} | {data.info['n_staypoints']:,} | "
            f"{data.info.get('generation_seconds', float('nan')):.1f} | "
            f"{data.info['seconds']:.1f} | {total:.1f} | {data.n_users - 1} | "
            f"{n['train']:,} / {n['validation']:,} / {n['test']:,} | {data.n_locations:,} | "
            f"{100 * data.info['unseen_targets']['test'] / max(n['test'], 1):.1f} % |"
        )
        t0 = time.perf_counter()
        res = run_baselines(data.train, data.test, data.n_locations)
        tb = time.perf_counter() - t0
        for bname, m in res.items():
            base_rows.append(
                f"| {name} | {bname} | {m['acc@1']:.2f} | {m['acc@5']:.2f} | {m['acc@10']:.2f} | "
                f"{m['mrr']:.2f} |"
            )
        base_rows.append(f"| {name} | (all four fitted and evaluated in {tb:.1f} s) | | | | |")
        sps, ms = _loader_throughput(data, args.batch_size)
        ds = MobilityDataset(data.train)
        batch = collate([ds[i] for i in range(min(args.batch_size, len(ds)))])
        step = _reference_step_ms(data.n_locations, batch)
        mean_len = float(np.mean(data.train.lengths))
        load_rows.append(
            f"| {name} | {mean_len:.1f} | {sps:,.0f} | {ms:.2f} | {step:.1f} | "
            f"{100 * ms / step:.1f} % |"
        )

    print("Generation and sample building (MHSA protocol, previous_day = 7)\n")
    print(
        "| preset | users generated | staypoints | generate (s) | build samples (s) | "
        "load_preset total (s) | users kept | samples train / val / test | vocabulary V | "
        "unseen test targets |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nBaselines on the test split (metrics in %; MRR over the top-100 list)\n")
    print("| preset | baseline | Acc@1 | Acc@5 | Acc@10 | MRR |")
    print("|---|---|---|---|---|---|")
    print("\n".join(base_rows))
    print(
        f"\nData loading (DataLoader, batch {args.batch_size}, shuffle, num_workers=0, one epoch "
        "of the training split) vs. a minimal full-softmax training step on one batch\n"
    )
    print(
        "| preset | mean history length | samples/s | ms per batch | minimal step (ms) | "
        "loading / step |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(load_rows))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
