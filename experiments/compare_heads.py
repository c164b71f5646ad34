"""The head comparison of the README: dense vs hierarchical-softmax heads, with and without history.

Trains every configuration below on one preset with the seed's model (``configs/<preset>.yaml``),
each run in its own ``hsoftmax train`` process (so its peak memory is its own), and writes a
Markdown table plus the raw results as JSON:

    python experiments/compare_heads.py --preset diy --epochs 100 --seeds 0 1 \\
        --out experiments/results/diy
    python experiments/compare_heads.py --preset geolife --epochs 2 --seeds 0 \\
        --configs dense dense+logit_add hs-kmeans128+mixture     # a reduced run
    OMP_NUM_THREADS=1 python experiments/compare_heads.py --preset geolife --jobs 2 --reuse \\
        --set train.num_threads=1      # two trainings at once, one core each; resumable
    python experiments/compare_heads.py --preset diy --out experiments/results/diy --table-only
        # no training: the table of every run recorded in results.json (all earlier calls)

Columns: the epochs each seed's run trained (early stopping ends a run before ``--epochs``; in
brackets the epoch whose weights are tested, the one with the lowest validation NLL), test
Acc@1/5/10, MRR, NDCG@10, weighted F1 (all %, exact ranks over all locations;
mean ± standard deviation over seeds), trainable parameters, training seconds per epoch (training
steps only, validation excluded; the median over the run's epochs, averaged over seeds; for a
quiet-machine figure see ``benchmarks/test_bench_train_step.py``), the whole training at that
pace (epochs x that median, in minutes, averaged over seeds: a head that needs more epochs to
early stopping pays for it here), and the peak resident memory
of the training process (``ru_maxrss``: data, model, optimizer and Python included, so it is an
upper bound on what the head adds). Every ``--set key=value`` is passed to each run (e.g.
``--set train.num_threads=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

# What every configuration starts from, on top of the preset's packaged config: the seed's model
# (configs/diy.yaml now defaults to the best model, with node smoothing and the user memory), so
# each name below states all it adds and the rows keep their meaning when the defaults move.
BASE = ["model.smoothing=leaves", "model.user_memory=0", "model.user_memory_context=false"]

# name -> config overrides (BASE, then these)
CONFIGS: dict[str, list[str]] = {
    "dense": ["model.head=dense", "model.history=none"],
    "dense+logit_add": ["model.head=dense", "model.history=logit_add"],
    "dense+mixture": ["model.head=dense", "model.history=mixture"],
    "hs-binary": ["model.head=hsoftmax", "model.tree=balanced", "model.history=none"],
    "hs-binary+mixture": ["model.head=hsoftmax", "model.tree=balanced", "model.history=mixture"],
    "hs-kmeans128": ["model.head=hsoftmax", "model.tree=kmeans", "model.history=none"],
    "hs-kmeans128+mixture": ["model.head=hsoftmax", "model.tree=kmeans", "model.history=mixture"],
    "hs-huffman": ["model.head=hsoftmax", "model.tree=huffman", "model.history=none"],
    "hs-huffman+mixture": ["model.head=hsoftmax", "model.tree=huffman", "model.history=mixture"],
    # label smoothing of each tree decision (O(path)) instead of over all V classes (O(V))
    "hs-binary+nodes": [
        "model.head=hsoftmax",
        "model.tree=balanced",
        "model.history=none",
        "model.smoothing=nodes",
    ],
    "hs-kmeans128+nodes": [
        "model.head=hsoftmax",
        "model.tree=kmeans",
        "model.history=none",
        "model.smoothing=nodes",
    ],
    "hs-huffman+nodes": [
        "model.head=hsoftmax",
        "model.tree=huffman",
        "model.history=none",
        "model.smoothing=nodes",
    ],
    # the mixture with the head's node smoothing (the gate and history part unsmoothed)
    "hs-binary+mixture+nodes": [
        "model.head=hsoftmax",
        "model.tree=balanced",
        "model.history=mixture",
        "model.smoothing=nodes",
    ],
    "hs-huffman+mixture+nodes": [
        "model.head=hsoftmax",
        "model.tree=huffman",
        "model.history=mixture",
        "model.smoothing=nodes",
    ],
    "hs-kmeans128+mixture+nodes": [
        "model.head=hsoftmax",
        "model.tree=kmeans",
        "model.history=mixture",
        "model.smoothing=nodes",
    ],
    # the pointer also over each user's 64 most visited training locations (UserMemory)
    "dense+mixture+memory": ["model.head=dense", "model.history=mixture", "model.user_memory=64"],
    "hs-kmeans128+mixture+nodes+memory": [
        "model.head=hsoftmax",
        "model.tree=kmeans",
        "model.history=mixture",
        "model.smoothing=nodes",
        "model.user_memory=64",
    ],
    # ... whose entries also score their visits in the example's weekday and time of day
    "dense+mixture+memory+context": [
        "model.head=dense",
        "model.history=mixture",
        "model.user_memory=64",
        "model.user_memory_context=true",
    ],
    "hs-kmeans128+mixture+nodes+memory+context": [
        "model.head=hsoftmax",
        "model.tree=kmeans",
        "model.history=mixture",
        "model.smoothing=nodes",
        "model.user_memory=64",
        "model.user_memory_context=true",
    ],
}
# ... each also trained on the next-stay loss at every history position (the window's own
# language-model loss through the head: ~L head targets per encoder pass)
# ... the tree heads with their N most frequent classes at the root (an adaptive-softmax head)
for _name in ("hs-kmeans128+nodes", "hs-kmeans128+mixture+nodes+memory+context"):
    for _n in (1000, 2000):
        CONFIGS[f"{_name}+frequent{_n}"] = [*CONFIGS[_name], f"model.tree_frequent={_n}"]
for _name in ("dense", "hs-kmeans128", "dense+mixture+memory+context",
              "hs-kmeans128+mixture+nodes+memory+context"):  # fmt: skip
    CONFIGS[f"{_name}+positions"] = [*CONFIGS[_name], "model.position_loss=1.0"]
CONFIGS = {name: [*BASE, *sets] for name, sets in CONFIGS.items()}
METRICS = ("acc@1", "acc@5", "acc@10", "mrr", "ndcg@10", "f1")


def _requested(name: str, seed: int, args) -> list[str]:
    """The config overrides that define this run (what a reused run must have been trained with)."""
    return [
        f"data.preset={args.preset}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        *CONFIGS[name],
        *args.set,
    ]


# Keys that do not change what a run computes: where it ran and what it printed.
_IGNORED = {
    "output.dir",
    "output.run_dir",
    "data.cache_dir",
    "train.progress",
    "train.num_threads",
    "train.device",
    "train.val_metrics",
}


def _fresh_sets(name: str, seed: int, args, run_dir: Path) -> list[str]:
    """The overrides a fresh run of this configuration is started with."""
    return [
        f"output.run_dir={run_dir}",
        "train.progress=false",
        "train.val_metrics=false",
        *_requested(name, seed, args),
    ]


def _check_reused(run_dir: Path, expected: dict) -> None:
    """Refuses to reuse or resume a run trained with other settings (e.g. a 2-epoch run in a
    100-epoch comparison, or one with another learning rate): its recorded ``config.yaml``,
    completed with today's defaults, must equal this comparison's config in every key that
    changes what a run computes."""
    from hsoftmax.training.config import ConfigError, config_diff, load_config

    try:
        recorded = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise SystemExit(
            f"{run_dir}: its config.yaml no longer loads ({e}); use another --out"
        ) from None
    diff = [d for d in config_diff(recorded, expected) if d[0] not in _IGNORED]
    if diff:
        what = ", ".join(f"{k}={a!r} (wanted {b!r})" for k, a, b in diff)
        raise SystemExit(
            f"{run_dir} was trained with {what}: use another --out for a comparison with "
            "other settings"
        )


def run_one(name: str, seed: int, args, out: Path) -> dict:
    from hsoftmax.training.config import load_config

    run_dir = out / "runs" / f"{name}-seed{seed}"
    sets = _fresh_sets(name, seed, args, run_dir)
    if args.reuse and (run_dir / "test_metrics.json").exists():
        _check_reused(run_dir, load_config(args.preset, sets))
        return _result(name, seed, run_dir, wall_seconds=None)
    if args.reuse and (run_dir / "ckpt.pt").exists():  # interrupted: continue it exactly
        _check_reused(run_dir, load_config(args.preset, sets))
        cmd = [sys.executable, "-m", "hsoftmax", "train", "--resume", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "hsoftmax", "train", "--config", args.preset]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} seed {seed} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return _result(name, seed, run_dir, wall_seconds=time.perf_counter() - t0)


def _result(name: str, seed: int, run_dir: Path, wall_seconds: float | None) -> dict:
    history = json.loads((run_dir / "metrics.json").read_text())
    return {
        "config": name,
        "seed": seed,
        "test": json.loads((run_dir / "test_metrics.json").read_text()),
        "params": json.loads((run_dir / "params.json").read_text()),
        "epochs": len(history),
        "best_epoch": _best_epoch(history),
        # median: robust to the few epochs another job slowed down
        "seconds_per_epoch": statistics.median(r["train_seconds"] for r in history),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in history),
        "wall_seconds": wall_seconds,
    }


def _best_epoch(history: list[dict]) -> int | None:
    """The epoch whose weights the run tested: the trainer's early-stopping rule, the lowest
    validation NLL (``improves``)."""
    from hsoftmax.training import improves

    best, best_epoch = float("inf"), None
    for i, row in enumerate(history):
        if "val_nll" not in row:
            return None
        if improves(row["val_nll"], best):
            best, best_epoch = row["val_nll"], i + 1
    return best_epoch


def _load_results(path: Path) -> dict[tuple[str, int], dict]:
    """The runs recorded in ``results.json`` by earlier calls, by (configuration, seed)."""
    if not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())
        return {(r["config"], int(r["seed"])): r for r in rows}
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"{path} is not a results file of this script ({e!r})") from None


def _write_results(path: Path, rows: list[dict]) -> None:
    """Atomically: an interruption leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)


def _table_of_recorded(args, out: Path) -> int:
    """``--table-only``: every run in ``results.json``, refreshed from its run directory where
    that is present (a row keeps its recorded ``wall_seconds``), in ``CONFIGS`` order."""
    recorded = _load_results(out / "results.json")
    if not recorded:
        raise SystemExit(f"{out / 'results.json'} holds no runs: nothing to tabulate")
    rows = []
    for (name, seed), r in recorded.items():
        run_dir = out / "runs" / f"{name}-seed{seed}"
        if (run_dir / "test_metrics.json").exists():
            r = _result(name, seed, run_dir, r.get("wall_seconds"))
        rows.append(r)
    order = {name: i for i, name in enumerate(CONFIGS)}
    rows.sort(key=lambda r: (order.get(r["config"], len(order)), r["config"], r["seed"]))
    _write_results(out / "results.json", rows)
    seeds = sorted({r["seed"] for r in rows})
    header = f"preset {args.preset}: every run recorded in {out / 'results.json'} (seeds {seeds})"
    doc = f"{header}\n\n{table(rows)}\n"
    (out / "table.md").write_text(doc)
    print(doc, end="")
    return 0


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _epochs_cell(rows: list[dict]) -> str:
    """Epochs trained per seed, e.g. ``23/20 (best 18/15)``; the best epochs where recorded."""
    cell = "/".join(str(r["epochs"]) for r in rows)
    best = [r.get("best_epoch") for r in rows]
    if None in best:
        return cell
    return f"{cell} (best {'/'.join(str(b) for b in best)})"


def table(results: list[dict]) -> str:
    lines = [
        "| configuration | seeds | epochs | Acc@1 | Acc@5 | Acc@10 | MRR | NDCG@10 | F1 "
        "| parameters | s/epoch | training (min) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == name]
        cells = [_cell([r["test"][m] for r in rows]) for m in METRICS]
        lines.append(
            f"| {name} | {len(rows)} | {_epochs_cell(rows)} | "
            + " | ".join(cells)
            + f" | {rows[0]['params']['total']:,} | "
            + f"{statistics.mean(r['seconds_per_epoch'] for r in rows):.1f} | "
            # epochs to early stopping x the median epoch: the whole training, at that pace
            + f"{statistics.mean(r['epochs'] * r['seconds_per_epoch'] for r in rows) / 60:.1f} | "
            + f"{max(r['peak_rss_mb'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="diy", choices=("diy", "geolife"))
    p.add_argument("--epochs", type=int, default=100, help="at most (early stopping applies)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--out", default=None, help="output directory (default experiments/results/<preset>)"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="trainings run at once (give each its own core)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take finished runs already in the output directory instead of training them "
        "again (a long comparison continues where it stopped)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: write the table of every run recorded in the output directory's "
        "results.json (all configurations and seeds of earlier calls)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    out = Path(args.out or f"experiments/results/{args.preset}")
    if args.table_only:
        return _table_of_recorded(args, out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(name, seed) for name in args.configs for seed in args.seeds]
    done: dict[tuple[str, int], dict] = {}
    # results.json keeps the runs of earlier calls (other configurations or seeds) too
    recorded = _load_results(out / "results.json")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, name, seed, args, out): (name, seed) for name, seed in todo}
        for future in as_completed(futures):
            name, seed = futures[future]
            r = future.result()
            if r["wall_seconds"] is None and (name, seed) in recorded:  # reused: keep its time
                r["wall_seconds"] = recorded[(name, seed)].get("wall_seconds")
            done[(name, seed)] = r
            wall = f"{r['wall_seconds']:.0f} s" if r["wall_seconds"] is not None else "reused"
            print(
                f"{name} seed {seed}: acc@1 {r['test']['acc@1']:.2f}, {r['epochs']} epochs, "
                f"{r['seconds_per_epoch']:.1f} s/epoch, {wall}",
                flush=True,
            )
            merged = {**recorded, **done}  # earlier calls' order, then this call's
            _write_results(out / "results.json", list(merged.values()))
    results = [done[key] for key in todo]
    text = table(results)
    header = (
        f"preset {args.preset}, epochs <= {args.epochs}, seeds {args.seeds}, overrides "
        f"{args.set or 'none'}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, "
        f"{args.jobs} training(s) at once"
    )
    (out / "table.md").write_text(f"{header}\n\n{text}\n")
    print(header)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
