"""Tree study: build time, shape, cost per example and training-step time of data-driven trees.

For the DIY-sized synthetic preset of :mod:`hsoftmax.data` (``load_preset("diy")``; if the data
module is missing or fails, a synthetic clustered city generated here), build

* balanced binary (the reference) and 128-ary, Huffman on the training-target counts,
* k-means on the location coordinates, 128-way two-level and binary,
* co-occurrence clusters (150-way) of the training transitions,

and print a Markdown table: build time, depth, mean (uniform over leaves) and expected (under the
target counts) dot products per example, and the time of one training step of the output layer
(forward + backward of ``path_log_prob(...).mean()``, B = 1024, D = 112, targets drawn from the
counts, median over ``--steps`` steps, timed round-robin across the trees).

    OMP_NUM_THREADS=2 PYTHONPATH=. python experiments/tree_study.py            # DIY preset
    OMP_NUM_THREADS=2 PYTHONPATH=. python experiments/tree_study.py --synthetic

Times are wall-clock on whatever else the machine is running: run it on a quiet machine, or read
the load average printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy.sparse as sp
import torch

from hsoftmax import Tree, trees
from hsoftmax.ops import path_log_prob


def synthetic_city(
    num_locations: int = 15_584,
    num_clusters: int = 100,
    region_km: float = 30.0,
    moves: int = 400_000,
    within: float = 0.85,
    seed: int = 0,
):
    """A DIY-like stand-in: locations in Gaussian clusters over a square region (as lat/lon
    degrees around Yogyakarta), Zipf(1.1) popularity, and transitions mostly within a cluster.

    Returns ``(latlon (V, 2), counts (V,), transitions (V, V) csr)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, region_km, size=(num_clusters, 2))
    cluster = rng.integers(0, num_clusters, num_locations)
    km = centres[cluster] + rng.normal(scale=region_km / 60, size=(num_locations, 2))
    lat = -7.8 + km[:, 1] / 111.2
    lon = 110.36 + km[:, 0] / (111.2 * np.cos(np.radians(-7.8)))
    popularity = 1.0 / rng.permutation(np.arange(1, num_locations + 1)) ** 1.1
    popularity /= popularity.sum()
    src = rng.choice(num_locations, size=moves, p=popularity)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(num_clusters + 1))
    # a within-cluster move goes to a member of the source's cluster, weighted by popularity
    dst = rng.choice(num_locations, size=moves, p=popularity)
    same = rng.random(moves) < within
    for c in range(num_clusters):
        members = order[starts[c] : starts[c + 1]]
        pick = same & (cluster[src] == c)
        if pick.any() and members.size:
            p = popularity[members] / popularity[members].sum()
            dst[pick] = rng.choice(members, size=int(pick.sum()), p=p)
    counts = np.bincount(dst, minlength=num_locations).astype(np.float64)
    transitions = sp.coo_matrix(
        (np.ones(moves), (src, dst)), shape=(num_locations, num_locations)
    ).tocsr()
    return np.stack([lat, lon], axis=1), counts, transitions


def diy_data(seed: int):
    """``(latlon, counts, transitions, description)`` from the data module's ``diy`` preset.

    Classes are the preset's ``n_locations`` (0 = padding and 1 = unseen have no coordinates;
    they are placed at the mean position). Counts are the training targets; transitions are
    consecutive stays of one user in the training records.
    """
    from hsoftmax.data import load_preset

    data = load_preset("diy", seed=seed, progress=False)
    v = data.n_locations
    locs = data.locations
    latlon = np.tile(np.nanmean(locs[["lat", "lon"]].to_numpy(), axis=0), (v, 1))
    coords = locs[["lat", "lon"]].to_numpy()
    known = ~np.isnan(coords).any(axis=1)
    latlon[locs["loc"].to_numpy()[known]] = coords[known]
    train = data.train
    counts = np.bincount(train.y, minlength=v).astype(np.float64)
    same_user = train.user[1:] == train.user[:-1]
    src, dst = train.loc[:-1][same_user], train.loc[1:][same_user]
    transitions = sp.coo_matrix((np.ones(src.size), (src, dst)), shape=(v, v)).tocsr()
    desc = (
        f"`load_preset('diy', seed={seed})`: V = {v:,} classes ({v - 2:,} locations + padding + "
        f"unseen), {len(train):,} training targets, {src.size:,} training transitions"
    )
    return latlon, counts, transitions, desc


class Step:
    """One output-layer training step for a tree: forward + backward of
    ``path_log_prob(...).mean()`` with gradients reset, on fixed random parameters and targets."""

    def __init__(self, tree: Tree, counts, batch: int, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        v = tree.num_leaves
        self.tree = tree
        self.hidden = torch.randn(batch, dim, generator=g).requires_grad_()
        self.weight = (torch.randn(v - 1, dim, generator=g) / dim**0.5).requires_grad_()
        self.bias = torch.zeros(v - 1, requires_grad=True)
        p = torch.as_tensor(counts, dtype=torch.float64) + 1e-12
        self.target = torch.multinomial(p / p.sum(), batch, replacement=True, generator=g)
        self.times: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            for t in (self.hidden, self.weight, self.bias):
                t.grad = None
            start = time.perf_counter()
            path_log_prob(
                self.hidden, self.weight, self.bias, self.tree, self.target
            ).mean().backward()
            if record:
                self.times.append(time.perf_counter() - start)

    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.times))

    def min_ms(self) -> float:
        return 1e3 * float(np.min(self.times))


def time_steps(steps: dict[str, Step], total: int, rounds: int = 5) -> None:
    """Warm every tree up, then time them round-robin, so a burst of load from other processes
    is shared out between the trees instead of landing on one of them."""
    for s in steps.values():
        s.run(3, record=False)
    per_round = max(1, total // rounds)
    for _ in range(rounds):
        for s in steps.values():
            s.run(per_round)


BUILDERS = {
    "balanced binary": lambda d, s: Tree.balanced(d["v"], 2),
    "balanced 128-ary": lambda d, s: Tree.balanced(d["v"], 128),
    "Huffman (binary, target counts)": lambda d, s: trees.huffman(d["counts"]),
    "k-means coords (128,)": lambda d, s: trees.from_features(
        d["latlon"], branching=(128,), seed=s, coords="latlon"
    ),
    "k-means coords binary": lambda d, s: trees.from_features(
        d["latlon"], branching="binary", seed=s, coords="latlon"
    ),
    "co-occurrence (150,)": lambda d, s: trees.from_cooccurrence(
        d["transitions"], branching=(150,), seed=s
    ),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="skip the data module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    desc = None
    if not args.synthetic:
        try:
            latlon, counts, transitions, desc = diy_data(args.seed)
        except Exception as e:  # noqa: BLE001 - any failure of the data module: fall back
            print(f"(data module unavailable: {type(e).__name__}: {e}; using synthetic data)")
    if desc is None:
        latlon, counts, transitions = synthetic_city(seed=args.seed)
        desc = (
            f"synthetic clustered city (this script): V = {len(counts):,}, 100 clusters over "
            "30 x 30 km, Zipf(1.1) popularity, 400,000 transitions (85 % within a cluster)"
        )
    data = {"v": len(counts), "latlon": latlon, "counts": counts, "transitions": transitions}

    print(f"Data: {desc}.")
    print(
        f"Step: forward+backward of `path_log_prob(...).mean()`, B = {args.batch}, D = {args.dim},"
        f" float32, {torch.get_num_threads()} threads, targets drawn from the counts, median of "
        f"{args.steps} steps per tree, timed round-robin. Load average before: {_load()}.\n"
    )
    header = (
        "| tree | build (s) | depth | internal nodes | mean dot products | "
        "expected dot products | expected path length | step median (ms) | step min (ms) |"
    )
    built, seconds = {}, {}
    for name, build in BUILDERS.items():
        start = time.perf_counter()
        built[name] = build(data, args.seed)
        seconds[name] = time.perf_counter() - start
    steps = {name: Step(t, counts, args.batch, args.dim, args.seed) for name, t in built.items()}
    time_steps(steps, args.steps)
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, tree in built.items():
        stats = trees.tree_stats(tree, counts)
        print(
            f"| {name} | {seconds[name]:.2f} | {stats['depth']} | {stats['num_internal']:,} | "
            f"{stats['mean_dot_products']:.1f} | {stats['expected_dot_products']:.1f} | "
            f"{stats['expected_path_length']:.2f} | {steps[name].median_ms():.2f} | "
            f"{steps[name].min_ms():.2f} |"
        )
    print(
        f"\nEntropy of the target counts: {stats['entropy_bits']:.2f} bits. Load average after: "
        f"{_load()}. {platform.processor() or platform.machine()}, torch {torch.__version__}."
    )


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
