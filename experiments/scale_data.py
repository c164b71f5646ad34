"""Statistics of the large-vocabulary presets and the time to build their trees.

    python experiments/scale_data.py --presets diy-100k diy-1m \
        --cache-dir ~/.cache/hsoftmax/data --out experiments/results/scale_data.json

For each preset: generate it and build its samples (MHSA protocol) with
:func:`hsoftmax.data.load_preset`, timing both, then build the trees the trainer offers over its
V classes with :func:`hsoftmax.models.build_tree` -- balanced 128-ary, Huffman (binary, on the
training targets' counts), and k-means on the locations' coordinates (root -> 128 clusters ->
locations, and root -> 128 -> 128 clusters -> locations) -- timing each.  Every figure is
measured by this run; with ``--cache-dir`` a preset already in the cache is not generated again
(``cached`` in the output): its generation time is the one recorded when it was, and
``load_preset_s`` only reads the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from hsoftmax import Tree, trees
from hsoftmax.data import synthetic
from hsoftmax.data.samples import load_preset
from hsoftmax.models import build_tree
from hsoftmax.trees import tree_stats

TREES = (
    ("balanced-128", "balanced", 128),
    ("huffman-2", "huffman", 2),
    ("kmeans-128", "kmeans", 128),
    # two k-means levels: about V / 16,384 leaves per last-level cluster instead of V / 128
    ("kmeans-128x128", "kmeans", [128, 128]),
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _preset_row(name: str, seed: int, cache: str) -> dict:
    cached = any(Path(cache).glob(f"{name}-seed{seed}/meta.json"))
    t0 = time.perf_counter()
    data = load_preset(name, seed=seed, cache_dir=cache, progress=False)
    load_s = time.perf_counter() - t0
    n = data.info["n_samples"]
    row = {
        "preset": name,
        "seed": seed,
        "users_generated": data.info["n_users_in"],
        "users_kept": data.n_users - 1,
        "staypoints": data.info["n_staypoints"],
        "V": data.n_locations,
        "samples": {k: n[k] for k in ("train", "validation", "test")},
        "mean_history_length": float(np.mean(data.train.lengths)),
        "generation_s": data.info.get("generation_seconds"),
        "load_preset_s": load_s,
        "cached": cached,  # True: load_preset_s only read the cache
        "trees": [],
    }
    for label, method, size in TREES:
        t0 = time.perf_counter()
        if method == "kmeans":
            tree = build_tree(method, data, branching=size)
        else:
            tree = build_tree(method, data, arity=size)
        seconds = time.perf_counter() - t0
        counts = np.bincount(np.asarray(data.train.y, dtype=np.int64), minlength=data.n_locations)
        row["trees"].append(_tree_row(name, label, tree, seconds, counts))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _tree_row(name: str, label: str, tree, seconds: float, counts) -> dict:
    """One tree's build time and shape, printed as it is measured."""
    stats = tree_stats(tree, counts)
    print(f"  {name} {label}: {seconds:.1f} s, depth {tree.depth}", flush=True)
    return {
        "tree": label,
        "build_s": seconds,
        "depth": stats["depth"],
        "nodes": stats["num_nodes"],
        "mean_path_length": stats["mean_path_length"],
        # dot products per training target: the kernel's cost of an example
        "expected_dot_products": stats["expected_dot_products"],
    }


def _simulation_row(name: str, seed: int) -> dict:
    """The generator's simulation only (no CSV text, no samples) and trees over the visited
    places: for a preset whose full pipeline needs more memory than this machine can spare."""
    cfg = synthetic.get_preset(name)
    c0, t0 = time.process_time(), time.perf_counter()
    user, place, _, _, xy = synthetic._simulate(cfg, seed, progress=False)
    row = {
        "preset": name,
        "seed": seed,
        "simulation_only": True,
        "users_generated": cfg.n_users,
        "staypoints": len(user),
        "visited_places": len(xy),
        "simulation_s": time.perf_counter() - t0,
        "simulation_cpu_s": time.process_time() - c0,
        "trees": [],
    }
    counts = np.bincount(place, minlength=len(xy))
    del user, place
    v = len(xy)
    builds = (
        ("balanced-128", lambda: Tree.balanced(v, 128)),
        ("huffman-2", lambda: trees.huffman(counts, 2)),
        ("kmeans-128", lambda: trees.from_features(xy, branching=(128,))),
        ("kmeans-128x128", lambda: trees.from_features(xy, branching=(128, 128))),
    )
    for label, build in builds:
        t0 = time.perf_counter()
        tree = build()
        row["trees"].append(_tree_row(name, label, tree, time.perf_counter() - t0, counts))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["diy-100k", "diy-1m"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="reuse/keep generated data here (default: a temp dir)")
    ap.add_argument(
        "--simulation-only",
        nargs="*",
        default=[],
        metavar="PRESET",
        help="for these presets time only the simulation and build the trees over the visited "
        "places (their staypoint text and samples need more memory than this machine spares)",
    )
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    machine = f"{_cpu_name()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}")
    tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="hsoftmax-scale-data-")
    cache = args.cache_dir or tmp.name
    rows = []
    for name in args.presets:
        if name in args.simulation_only:
            rows.append(_simulation_row(name, args.seed))
        else:
            rows.append(_preset_row(name, args.seed, cache))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | users kept | staypoints | V | samples train / val / test | generate (s) "
          "| load_preset (s) | " + " | ".join(f"{t[0]} (s)" for t in TREES) + " |")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + "---|" * len(TREES))
    for r in rows:
        if r.get("simulation_only"):
            print(
                f"| {r['preset']} (simulation only) | {r['users_generated']:,} generated | "
                f"{r['staypoints']:,} | {r['visited_places']:,} visited | | "
                f"{r['simulation_s']:.0f} | | "
                + " | ".join(f"{t['build_s']:.1f}" for t in r["trees"][:3])
                + " |"
            )
            continue
        n = r["samples"]
        print(
            f"| {r['preset']} | {r['users_kept']:,} | {r['staypoints']:,} | {r['V']:,} | "
            f"{n['train']:,} / {n['validation']:,} / {n['test']:,} | {r['generation_s']:.0f} | "
            f"{r['load_preset_s']:.0f} | "
            + " | ".join(f"{t['build_s']:.1f}" for t in r["trees"])
            + " |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
