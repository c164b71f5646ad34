"""``hsoftmax tree ...`` sub-commands: ``build`` a tree file from data, print a tree's ``stats``.

    hsoftmax tree build --method balanced --num-leaves 15584 --arity 2 --out balanced.hst
    hsoftmax tree build --method huffman --counts counts.npy --out huffman.hst
    hsoftmax tree build --method kmeans --features locations.csv --columns lat,lon \\
        --coords latlon --branching 128 --out kmeans.hst
    hsoftmax tree build --method cooccurrence --transitions transitions.npz --branching 150 \\
        --out cooc.hst
    hsoftmax tree stats kmeans.hst --counts counts.npy

Input files: see :mod:`hsoftmax.trees.io`.
Each handler returns an exit code: 0 ok, 1 bad input (the message names the file and problem).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hsoftmax.cli._errors import guarded
from hsoftmax.trees.io import InputError, read_counts, read_features, read_transitions

METHODS = ("balanced", "huffman", "kmeans", "cooccurrence")


def parse_branching(text: str):
    """``"binary"`` | ``"128"`` | ``"16,16"`` -> the ``branching`` argument of the builders."""
    text = text.strip()
    if text == "binary":
        return "binary"
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--branching must be 'binary' or comma-separated ints like 128 or 16,16, got {text!r}"
        ) from None


# ------------------------------------------------------------------------------------ output


def format_stats(stats: dict, name: str = "") -> str:
    """A small plain-text table of :func:`hsoftmax.trees.tree_stats`."""
    has_counts = "expected_path_length" in stats
    lines = [
        f"{name + ': ' if name else ''}{stats['num_leaves']:,} leaves, {stats['num_nodes']:,} "
        f"nodes ({stats['num_internal']:,} internal), depth {stats['depth']}",
        f"{'per example':<14}{'mean':>10}{'max':>8}" + (f"{'expected':>11}" if has_counts else ""),
    ]
    for label, key in (("path length", "path_length"), ("dot products", "dot_products")):
        row = f"{label:<14}{stats['mean_' + key]:>10.2f}{stats['max_' + key]:>8d}"
        if has_counts:
            row += f"{stats['expected_' + key]:>11.2f}"
        lines.append(row)
    if has_counts:
        lines.append(f"entropy of the counts: {stats['entropy_bits']:.2f} bits")
    hist = stats["depth_histogram"]
    lines.append("leaves per depth: " + ", ".join(f"{d}: {c}" for d, c in enumerate(hist) if c))
    branching = stats["branching_histogram"]
    if branching:
        sizes = np.repeat(list(branching), list(branching.values()))
        lines.append(
            f"children per internal node: min {sizes.min()}, median {np.median(sizes):g}, "
            f"max {sizes.max()}"
            + (
                " (" + ", ".join(f"{k}: {c}" for k, c in branching.items()) + ")"
                if len(branching) <= 8
                else ""
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- handlers


def _build(args) -> int:
    from hsoftmax import Tree, trees
    from hsoftmax.trees import tree_stats

    counts = read_counts(args.counts) if args.counts else None
    progress = not args.no_progress
    start = time.perf_counter()
    if args.method == "balanced":
        v = args.num_leaves if args.num_leaves is not None else _len_or_none(counts)
        if v is None:
            raise InputError("--method balanced needs --num-leaves (or --counts)")
        tree = Tree.balanced(v, args.arity)
    elif args.method == "huffman":
        if counts is None:
            raise InputError("--method huffman needs --counts FILE")
        tree = trees.huffman(counts, arity=args.arity)
    elif args.method == "kmeans":
        features, coords = _kmeans_features(args)
        tree = trees.from_features(
            features,
            branching=args.branching if args.branching is not None else (128,),
            seed=args.seed,
            coords=coords,
            max_children=args.max_children,
            progress=progress,
        )
    else:
        if not args.transitions:
            raise InputError("--method cooccurrence needs --transitions FILE")
        tree = trees.from_cooccurrence(
            read_transitions(args.transitions),
            branching=args.branching if args.branching is not None else (150,),
            seed=args.seed,
            dim=args.dim,
            max_children=args.max_children,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    if args.num_leaves is not None and tree.num_leaves != args.num_leaves:
        raise InputError(f"--num-leaves {args.num_leaves} but the input has {tree.num_leaves}")
    if counts is not None and counts.size != tree.num_leaves:
        raise InputError(
            f"{args.counts}: {counts.size} counts but the tree has {tree.num_leaves} leaves"
        )
    tree.save(args.out)
    stats = tree_stats(tree, counts)
    if args.json:
        print(json.dumps({"method": args.method, "seconds": seconds, **stats}))
    else:
        print(f"{args.method} tree built in {seconds:.2f} s -> {args.out}")
        print(format_stats(stats))
    return 0


def _kmeans_features(args):
    """The k-means input: the data's whole vocabulary (``--data DIR``: one leaf per model class,
    padding and unseen ids included), a trackintel location file (WKT ``center``), or a table."""
    coords = None if args.coords == "euclidean" else args.coords
    if args.data:
        from hsoftmax.data import load_dir
        from hsoftmax.data.staypoints import vocabulary_coordinates

        data = load_dir(args.data, previous_day=args.previous_day, progress=False)
        latlon = vocabulary_coordinates(data.locations, data.n_locations, str(args.data))
        return latlon, "latlon"
    if not args.features:
        raise InputError("--method kmeans needs --features FILE or --data DIR")
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    if columns is None and Path(args.features).suffix.lower() == ".csv":
        import pandas as pd

        header = pd.read_csv(args.features, nrows=0).columns
        if {"center", "geom", "geometry"} & set(header):  # a trackintel location file
            from hsoftmax.data import read_locations

            locs = read_locations(args.features)
            return locs[["lat", "lon"]].to_numpy(), "latlon"
    return read_features(args.features, columns), coords


def _len_or_none(counts):
    return None if counts is None else int(counts.size)


def _stats(args) -> int:
    from hsoftmax import Tree
    from hsoftmax.trees import tree_stats

    tree = Tree.load(args.file)
    counts = read_counts(args.counts) if args.counts else None
    if counts is not None and counts.size != tree.num_leaves:
        raise InputError(
            f"{args.counts}: {counts.size} counts but {args.file} has {tree.num_leaves} leaves"
        )
    stats = tree_stats(tree, counts)
    print(json.dumps(stats) if args.json else format_stats(stats, str(args.file)))
    return 0


def _guard(func):
    return guarded(func, (InputError, ValueError, TypeError, FileNotFoundError))


def register(subparsers) -> None:
    """Add the ``tree`` command group (``build``, ``stats``) to ``subparsers``."""
    tree = subparsers.add_parser(
        "tree",
        help="build hierarchical-softmax trees from data, print tree statistics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = tree.add_subparsers(dest="tree_command", metavar="SUBCOMMAND")
    tree.set_defaults(func=lambda args: (tree.print_help(), 2)[1])

    p = sub.add_parser("build", help="build a tree, write it with Tree.save, print its stats")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--out", required=True, help="output tree file (e.g. tree.hst)")
    p.add_argument("--num-leaves", type=int, help="V (balanced; checked against inputs)")
    p.add_argument("--counts", help="leaf counts (.npy or one per line): huffman input; stats")
    p.add_argument(
        "--features",
        help="kmeans: per-leaf features (.npy or CSV, or a trackintel locations.csv: its rows)",
    )
    p.add_argument(
        "--data",
        help="kmeans: a data directory (as `hsoftmax train --data`): one leaf per location id of "
        "its vocabulary, coordinates from its locations.csv; the tree fits model.tree=FILE",
    )
    p.add_argument("--previous-day", type=int, help="with --data: the MHSA variant / window")
    p.add_argument("--columns", help="kmeans: CSV columns to use, e.g. lat,lon")
    p.add_argument(
        "--coords",
        choices=("latlon", "euclidean"),
        default="euclidean",
        help="kmeans: 'latlon' projects (lat, lon) degrees to km first",
    )
    p.add_argument("--transitions", help="cooccurrence: (V, V) counts, sparse .npz or .npy")
    p.add_argument("--arity", type=int, default=2, help="balanced, huffman: children per node")
    p.add_argument(
        "--branching",
        type=parse_branching,
        help="kmeans, cooccurrence: 'binary', 128, 16,16 ... (default 128 / 150)",
    )
    p.add_argument("--max-children", type=int, help="kmeans, cooccurrence: largest cluster")
    p.add_argument("--dim", type=int, help="cooccurrence: spectral embedding size (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(_build))

    p = sub.add_parser("stats", help="print the statistics of a tree file")
    p.add_argument("file", help="a tree file written by Tree.save / tree build")
    p.add_argument("--counts", help="leaf counts for the expected costs")
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    p.set_defaults(func=_guard(_stats))
