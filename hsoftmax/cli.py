"""The `hsoftmax` command line: one sub-command group per area of the package.

Each area registers its own sub-commands through a ``register(subparsers)`` function so this file
stays a thin router and the areas do not import each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it defines ``register(subparsers)`` adding its sub-command(s)
_AREAS = ("hsoftmax.data.cli", "hsoftmax.tree_cli", "hsoftmax.train_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsoftmax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _AREAS:
        importlib.import_module(name).register(subparsers)
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
