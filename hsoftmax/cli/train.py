"""``hsoftmax train`` and ``hsoftmax evaluate``.

``hsoftmax train`` with no arguments runs the packaged demo config (synthetic DIY-like data at the
full ~15,600 locations). Every config key can be overridden: ``--set model.d_model=64``.
Under ``torchrun --nproc_per_node N -m hsoftmax.cli train ...`` it trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands to the ``hsoftmax`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train a next-location model (no arguments: the demo)",
        description=__doc__.splitlines()[0] + " Train a next-location model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  hsoftmax train                                   # the demo (configs/demo.yaml)\n"
        "  hsoftmax train --config diy --set train.epochs=3 # packaged config by name\n"
        "  hsoftmax train --config configs/geolife.yaml --set model.head=dense "
        "--set model.history=logit_add\n"
        "  hsoftmax train --config diy --data path/to/mhsa_pickles\n"
        "  hsoftmax train --resume runs/demo-20250101-120000 --set train.epochs=4",
    )
    p.add_argument("--config", help="YAML file or packaged name (demo, diy, geolife); default demo")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. model.d_model=64 (repeatable)",
    )
    p.add_argument("overrides_pos", nargs="*", metavar="KEY=VALUE", help="same as --set")
    p.add_argument("--data", help="directory of MHSA pickles or staypoints.csv (data.path)")
    p.add_argument("--name", help="run name (default: the data directory's name, or the config's)")
    p.add_argument("--preset", help="synthetic preset: diy, geolife, small (data.preset)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    p.add_argument("--out", help="parent directory of run directories (output.dir)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (train.device)")
    p.add_argument("--allow-over-budget", action="store_true", help="train.allow_over_budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    e = subparsers.add_parser(
        "evaluate",
        help="re-evaluate a run's checkpoint, or an ensemble of runs",
        description=_evaluate.__doc__,
    )
    e.add_argument("run_dir", metavar="RUN_DIR", nargs="+")
    e.add_argument("--out", help="ensemble: also write the metrics to this JSON file")
    _add_split_and_which(e)
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_evaluate)

    pr = subparsers.add_parser(
        "predict",
        help="write a run's top-k next-location predictions to a CSV",
        description=_predict.__doc__,
    )
    pr.add_argument("run_dir", metavar="RUN_DIR")
    pr.add_argument("--data", help="data directory (default: the run's own data)")
    pr.add_argument("--out", default="predictions.csv", help="CSV file to write")
    pr.add_argument("--k", type=int, default=10, help="locations per sample (default 10)")
    _add_split_and_which(pr)
    pr.set_defaults(func=_predict)


def _add_split_and_which(parser) -> None:
    """The split to use and which checkpoint of a run (evaluate and predict)."""
    parser.add_argument("--split", choices=("test", "validation", "train"), default="test")
    parser.add_argument("--which", choices=("best", "last"), default="best")


def _overrides(args) -> list[str]:
    out = list(args.overrides) + list(getattr(args, "overrides_pos", []) or [])
    if getattr(args, "name", None):
        out.insert(0, f"name={args.name}")
    elif getattr(args, "data", None) and not any(o.startswith("name=") for o in out):
        out.insert(0, f"name={Path(args.data).expanduser().resolve().name or 'data'}")
    for flag, key in (
        ("data", "data.path"),
        ("preset", "data.preset"),
        ("out", "output.dir"),
        ("device", "train.device"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "allow_over_budget", False):
        out.append("train.allow_over_budget=true")
    if args.no_progress:
        out.append("train.progress=false")
    return out


def _train(args) -> int:
    from hsoftmax.training import load_config, train

    try:
        if args.resume:
            if args.config:
                raise ValueError(
                    "--config cannot be combined with --resume: a resumed run keeps its own "
                    "config.yaml (use --set for the keys it may change, e.g. train.epochs)"
                )
            train(resume=args.resume, overrides=_overrides(args))
            return 0
        cfg = load_config(args.config or "demo", _overrides(args))
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # config, budget, data format errors
        print(f"hsoftmax train: error: {e}", file=sys.stderr)
        return 1
    return 0


def _predict(args) -> int:
    """Predict with RUN_DIR's best checkpoint: one row per sample of a split with the user, the
    true next location and the top-k locations with their probabilities, in the data's original
    ids."""
    from hsoftmax.training import predict_run

    try:
        out = predict_run(
            args.run_dir, args.out, data_path=args.data, split=args.split, k=args.k,
            which=args.which,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"hsoftmax predict: error: {e}", file=sys.stderr)
        return 1
    print(f"predictions written to {out}")
    return 0


def _evaluate(args) -> int:
    """Re-evaluate RUN_DIR/ckpt.pt (the best epoch) and print the metrics table. With several
    RUN_DIRs: the ensemble that averages their probabilities (exact top-k and ranks over all
    classes); the runs must share their data."""
    from hsoftmax.training import evaluate_ensemble, evaluate_run

    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    try:
        if len(args.run_dir) == 1:
            evaluate_run(args.run_dir[0], split=args.split, which=args.which, overrides=overrides)
        elif args.overrides:
            raise ValueError("--set applies to one run; an ensemble uses each run's own config")
        else:
            evaluate_ensemble(
                args.run_dir, split=args.split, which=args.which, out=args.out,
                progress=not args.no_progress,
            )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"hsoftmax evaluate: error: {e}", file=sys.stderr)
        return 1
    return 0
