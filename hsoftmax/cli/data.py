"""``hsoftmax data ...`` sub-commands: ``synth``, ``samples``, ``baselines``.

Each handler takes the parsed ``args`` and returns an exit code (0 ok, 1 bad input).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from zoneinfo import ZoneInfoNotFoundError

from hsoftmax.cli._errors import guarded
from hsoftmax.data.synthetic import PRESETS

logger = logging.getLogger("hsoftmax.data")


def _setup_logging() -> None:
    # the drop/clip counts are INFO/WARNING records of "hsoftmax.data"; show them on stderr
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


def _synth(args) -> int:
    from hsoftmax.data.synthetic import synthesize_to_dir

    res = synthesize_to_dir(args.preset, args.seed, args.out, progress=not args.no_progress)
    print(
        f"{args.preset} seed {args.seed}: {len(res.staypoints)} staypoints, "
        f"{res.staypoints['user_id'].nunique()} users, {len(res.locations)} locations in "
        f"{res.seconds:.1f} s -> {Path(args.out) / 'staypoints.csv'}, "
        f"{Path(args.out) / 'locations.csv'}"
    )
    return 0


def _samples(args) -> int:
    # the loader `hsoftmax train --data` uses, with the same options
    from hsoftmax.data.sources import find_staypoint_files, load_dir, load_staypoints

    options = {
        "split": tuple(args.split),
        "previous_day": args.previous_day,
        "min_history": args.min_history,
        "tz": args.tz,
        "progress": not args.no_progress,
    }
    if args.data:
        data = load_dir(args.data, **options)
    else:
        locations = args.locations or find_staypoint_files(Path(args.staypoints).parent)[1]
        data = load_staypoints(args.staypoints, locations, **options)
    paths = data.write_mhsa(args.out, prefix=args.prefix)
    n = data.info["n_samples"]
    print(
        f"samples train/validation/test: {n['train']}/{n['validation']}/{n['test']}, "
        f"vocabulary {data.n_locations} (incl. padding and unseen), users {data.n_users - 1}"
    )
    for p in paths:
        print(f"wrote {p}")
    return 0


def _baselines(args) -> int:
    from hsoftmax.data.baselines import BASELINES, run_baselines
    from hsoftmax.data.samples import SampleSet, load_mhsa, load_preset

    if args.samples:
        d = Path(args.samples)
        meta_path = d / f"{args.prefix}meta.json"
        n_loc = json.loads(meta_path.read_text())["n_locations"] if meta_path.is_file() else None
        train = load_mhsa(d / f"{args.prefix}train.pk", n_loc, as_sampleset=True)
        test = load_mhsa(d / f"{args.prefix}{args.split}.pk", n_loc, as_sampleset=True)
        assert isinstance(train, SampleSet) and isinstance(test, SampleSet)
        if n_loc is None:
            n_loc = int(max(train.y.max(), train.loc.max(), test.y.max(), test.loc.max())) + 1
        label = str(d)
    else:
        data = load_preset(
            args.preset, seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress
        )
        train, test, n_loc = data.train, data.splits[args.split], data.n_locations
        label = f"{args.preset} seed {args.seed}"
    names = tuple(args.only) if args.only else BASELINES
    res = run_baselines(train, test, n_loc, names)
    print(f"baselines on {label}, {args.split} split ({len(test)} samples), metrics in %")
    print(f"{'baseline':<18} {'Acc@1':>6} {'Acc@5':>6} {'Acc@10':>6} {'MRR':>6}")
    for name, m in res.items():
        print(f"{name:<18} {m['acc@1']:6.2f} {m['acc@5']:6.2f} {m['acc@10']:6.2f} {m['mrr']:6.2f}")
    return 0


def _guard(func):
    # bad files (DataFormatError is a ValueError) and bad arguments (a split that does not sum
    # to 1, an unknown time zone)
    return guarded(func, (FileNotFoundError, ValueError, ZoneInfoNotFoundError), _setup_logging)


def register(subparsers) -> None:
    """Add the ``data`` command group (``synth``, ``samples``, ``baselines``) to ``subparsers``."""
    data = subparsers.add_parser(
        "data", help="synthetic mobility data, MHSA samples, baselines", description=__doc__
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("synth", help="generate a synthetic preset as staypoint/location CSVs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="diy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_synth))

    p = sub.add_parser("samples", help="build MHSA sample pickles from a staypoint CSV")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a data directory, as `hsoftmax train --data` reads it")
    source.add_argument("--staypoints", help="staypoint CSV (trackintel columns)")
    p.add_argument(
        "--locations",
        help="location CSV (id, lat, lon or WKT center; default: locations.csv beside the "
        "staypoints, as with `hsoftmax train --data`)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default="", help="file name prefix of the outputs")
    p.add_argument(
        "--split", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST")
    )
    p.add_argument("--previous-day", type=int, default=7, help="history window in days")
    p.add_argument("--min-history", type=int, default=3, help="minimum history stays")
    p.add_argument("--tz", help="time zone for offset-aware timestamps (default: wall time)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guard(_samples))

    p = sub.add_parser("baselines", help="most-frequent and Markov baselines (Acc@k, MRR)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="diy")
    src.add_argument("--samples", help="directory written by `hsoftmax data samples`")
    p.add_argument("--prefix", default="", help="file name prefix used with --samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="preset cache directory (default ~/.cache/hsoftmax/data)")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--only", nargs="+", help="subset of baselines to run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guard(_baselines))
