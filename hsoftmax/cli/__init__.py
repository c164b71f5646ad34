"""The ``hsoftmax`` command (also ``python -m hsoftmax``): one entry point, one sub-command group
per area.

* ``hsoftmax train`` / ``evaluate`` / ``predict`` (:mod:`hsoftmax.cli.train`);
* ``hsoftmax tree build|stats`` (:mod:`hsoftmax.cli.tree`);
* ``hsoftmax data synth|samples|baselines`` (:mod:`hsoftmax.cli.data`).

Each area adds its sub-commands through ``register(subparsers)`` and imports its heavy
dependencies only when its command runs, so ``hsoftmax --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

from hsoftmax._version import __version__
from hsoftmax.cli import data, train, tree

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsoftmax",
        description="hsoftmax: a fused hierarchical-softmax head for PyTorch, and a "
        "next-location model that uses it.",
    )
    parser.add_argument("--version", action="version", version=f"hsoftmax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in (train, tree, data):
        area.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
