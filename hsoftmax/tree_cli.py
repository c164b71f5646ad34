"""``hsoftmax tree ...`` sub-commands: ``build`` a tree file from data, print a tree's ``stats``.

    hsoftmax tree build --method balanced --num-leaves 15584 --arity 2 --out balanced.hst
    hsoftmax tree build --method huffman --counts counts.npy --out huffman.hst
    hsoftmax tree build --method kmeans --features locations.csv --columns lat,lon \\
        --coords latlon --branching 128 --out kmeans.hst
    hsoftmax tree build --method cooccurrence --transitions transitions.npz --branching 150 \\
        --out cooc.hst
    hsoftmax tree stats kmeans.hst --counts counts.npy

Input files: counts are ``.npy`` or text/CSV with one number per line (a header line is allowed);
features are ``.npy`` (V, F) or CSV (a header line is allowed; ``--columns`` picks named columns);
transitions are a scipy.sparse ``.npz`` (``scipy.sparse.save_npz``) or a dense ``.npy``.
Each handler returns an exit code: 0 ok, 1 bad input (the message names the file and problem).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("balanced", "huffman", "kmeans", "cooccurrence")


class InputError(ValueError):
    """A bad input file or argument; the message names it."""


# ------------------------------------------------------------------------------------ readers


def read_counts(path: str | Path) -> np.ndarray:
    """(V,) counts from ``.npy`` or a text file with one number per line."""
    arr = _read_table(path)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(f"{path}: counts must be one number per line, got shape {arr.shape}")
    return arr


def read_features(path: str | Path, columns: list[str] | None = None) -> np.ndarray:
    """(V, F) features from ``.npy`` or CSV (with ``columns`` picked by header name)."""
    arr = _read_table(path, columns)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InputError(f"{path}: features must be a (V, F) table, got shape {arr.shape}")
    return arr


def read_transitions(path: str | Path):
    """(V, V) transition counts from a scipy.sparse ``.npz`` or a dense ``.npy``."""
    import scipy.sparse as sp

    path = Path(path)
    _must_exist(path)
    try:
        if path.suffix == ".npz":
            return sp.load_npz(path)
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{path}: not a readable transition matrix ({e})") from e
    raise InputError(f"{path}: transitions must be a scipy.sparse .npz or a dense .npy file")


def _must_exist(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such file")


def _read_table(path: str | Path, columns: list[str] | None = None) -> np.ndarray:
    path = Path(path)
    _must_exist(path)
    if path.suffix == ".npy":
        if columns:
            raise InputError(f"{path}: --columns needs a CSV file with a header line")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"{path}: must hold numbers, got dtype {arr.dtype}")
        return arr
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text/CSV file (use .npy for binary arrays)") from None
    if not lines:
        raise InputError(f"{path}: the file is empty")
    header = None
    if not _is_numeric_row(lines[0]):
        header = [name.strip() for name in lines[0].split(",")]
        lines = lines[1:]
    if columns:
        if header is None:
            raise InputError(f"{path}: --columns {','.join(columns)} needs a header line")
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(f"{path}: no column(s) {missing}; the header has {header}")
        picks = [header.index(c) for c in columns]
    rows = []
    for number, line in enumerate(lines, start=2 if header else 1):
        cells = line.split(",")
        if columns:
            if len(cells) != len(header):
                raise InputError(
                    f"{path}: line {number} has {len(cells)} cells, expected {len(header)}"
                )
            cells = [cells[i] for i in picks]
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            raise InputError(f"{path}: line {number} is not numeric: {line[:60]!r}") from None
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise InputError(f"{path}: rows have different numbers of values {sorted(widths)}")
    if not rows:
        raise InputError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def _is_numeric_row(line: str) -> bool:
    try:
        [float(c) for c in line.split(",")]
    except ValueError:
        return False
    return True


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
    """A small plain-text table of :func:`hsoftmax.builders.tree_stats`."""
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
    from hsoftmax import Tree, builders

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
        tree = builders.huffman(counts, arity=args.arity)
    elif args.method == "kmeans":
        if not args.features:
            raise InputError("--method kmeans needs --features FILE")
        columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
        features = read_features(args.features, columns)
        tree = builders.from_features(
            features,
            branching=args.branching if args.branching is not None else (128,),
            seed=args.seed,
            coords=None if args.coords == "euclidean" else args.coords,
            max_children=args.max_children,
            progress=progress,
        )
    else:
        if not args.transitions:
            raise InputError("--method cooccurrence needs --transitions FILE")
        tree = builders.from_cooccurrence(
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
    stats = tree.stats(counts)
    if args.json:
        print(json.dumps({"method": args.method, "seconds": seconds, **stats}))
    else:
        print(f"{args.method} tree built in {seconds:.2f} s -> {args.out}")
        print(format_stats(stats))
    return 0


def _len_or_none(counts):
    return None if counts is None else int(counts.size)


def _stats(args) -> int:
    from hsoftmax import Tree

    tree = Tree.load(args.file)
    counts = read_counts(args.counts) if args.counts else None
    if counts is not None and counts.size != tree.num_leaves:
        raise InputError(
            f"{args.counts}: {counts.size} counts but {args.file} has {tree.num_leaves} leaves"
        )
    stats = tree.stats(counts)
    print(json.dumps(stats) if args.json else format_stats(stats, str(args.file)))
    return 0


def _guard(func):
    def run(args) -> int:
        try:
            return func(args)
        except (InputError, ValueError, TypeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


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
    p.add_argument("--features", help="kmeans: per-leaf features (.npy or CSV)")
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


def main(argv: list[str] | None = None) -> int:
    """Run ``hsoftmax tree ...`` without the top-level router (for testing)."""
    parser = argparse.ArgumentParser(prog="hsoftmax")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tree", *(argv or [])])
    return int(args.func(args) or 0)
