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
    _add_condition_command(subparsers)
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


def _add_condition_command(subparsers: argparse._SubParsersAction) -> None:
    from scedit_ui import annotators, conditions

    command = subparsers.add_parser(
        "condition",
        help="make a condition image (canny, colour, mask, sketch, depth, pose, ...) from a picture",
        description="Make the condition image of KIND from a picture, at the generation size.",
        epilog="kinds and their parameters (set with -p NAME=VALUE):\n" + conditions.describe_kinds(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(conditions.CONDITION_KINDS)}")
    command.add_argument("--in", dest="input", required=True, metavar="IMAGE", help="the picture")
    command.add_argument("--out", required=True, metavar="FILE.png", help="where to write the condition image")
    command.add_argument("--size", metavar="WxH", help="generation size, e.g. 512x512 (default: the picture's size)")
    command.add_argument("--fit", choices=conditions.FIT_MODES, default="crop", help="how the picture is brought to the size")
    command.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="a parameter of KIND (repeatable)")
    command.add_argument("--mask", metavar="IMAGE", help="inpaint: the area to generate, white (or opaque) on black (or transparent)")
    command.add_argument("--mask-out", metavar="FILE.png", help="inpaint/outpaint: also write the mask of the area to generate")
    command.add_argument("--annotators", metavar="DIR", help=f"folder of annotator weights (default: ${annotators.ANNOTATORS_ENV})")

    def run(args: argparse.Namespace) -> int:
        params = conditions.parse_params(args.kind, args.param)
        if args.mask:
            conditions.condition_kind(args.kind).param("mask")  # refuses --mask for kinds that take none
            params["mask"] = conditions.load_mask(args.mask)
        if args.annotators:
            annotators.set_annotators_dir(args.annotators)
        image = conditions.load_image(args.input)
        size = conditions.parse_size(args.size) if args.size else image.size
        result = conditions.extract(image, conditions.ConditionRequest(args.kind, size, args.fit, params), cache=None)
        if args.mask_out and result.mask is None:
            raise UserInputError(f"{args.kind} makes no mask; --mask-out is for inpaint and outpaint")
        conditions.save_image(result.image, args.out)
        if args.mask_out:
            conditions.save_image(result.mask, args.mask_out)
        return 0

    command.set_defaults(handler=run)
