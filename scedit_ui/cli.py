"""`python -m scedit_ui SUBCOMMAND ...`: the command-line edge of the app.

Each subcommand parses its arguments and calls the same library functions as the UI and the tests.
A `UserInputError` becomes a one-line message on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from scedit_ui.errors import UserInputError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scedit_ui", description="SCEdit Studio command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Each subcommand is added by one `_add_<name>_command(subparsers)` function below.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
