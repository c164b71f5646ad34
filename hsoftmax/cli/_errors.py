"""One rule for every sub-command: a bad input prints ``error: <message>`` and exits 1."""

from __future__ import annotations

import sys

__all__ = ["guarded"]


def guarded(func, errors: tuple[type[BaseException], ...], setup=None):
    """``func(args)`` as a handler that turns ``errors`` (bad files, bad arguments) into a
    one-line message on stderr and exit code 1 instead of a traceback."""

    def run(args) -> int:
        if setup is not None:
            setup()
        try:
            return func(args)
        except errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run
