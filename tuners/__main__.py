"""`python -m tuners info --arch sd15|sd21|sdxl --tuner sc|csc [--down-ratio R] [--kernel K] [--json]`.

Counts trainable parameters per part on the meta device: no weights, no download.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

from tuners.csc_tuner import CSCTuner
from tuners.layout import SkipLayout
from tuners.reference_configs import ARCHITECTURES, build_meta_unet
from tuners.sc_tuner import SCTuner


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_report(architecture: str, kind: str, down_ratio: float = 1.0, kernel_size: int = 1) -> dict:
    """Trainable parameters per part and in total for a tuner on a reference architecture."""
    layout = SkipLayout.from_unet(build_meta_unet(architecture))
    with torch.device("meta"):
        if kind == "sc":
            tuner = SCTuner(layout, down_ratio)
            parts = {"skip adapters": count_parameters(tuner.adapters)}
        else:
            tuner = CSCTuner(layout, kernel_size)
            parts = {
                "hint encoder": count_parameters(tuner.pre_hint_blocks),
                "dense convs": count_parameters(tuner.dense_hint_blocks),
                "per-skip tuner ops": count_parameters(tuner.lsc_tuner_blocks),
            }
    report = {
        "architecture": architecture,
        "tuner": kind,
        "skips": layout.num_skips,
        "skip_channels": list(layout.channels),
        "parts": parts,
        "total": count_parameters(tuner),
    }
    report.update({"down_ratio": down_ratio} if kind == "sc" else {"kernel_size": kernel_size})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuners", description="skip-connection tuner tools")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="trainable parameters of a tuner on a reference architecture")
    info.add_argument("--arch", choices=ARCHITECTURES, required=True)
    info.add_argument("--tuner", choices=("sc", "csc"), required=True)
    info.add_argument("--down-ratio", type=float, default=1.0, help="SC adapter mid width / channels (default 1.0)")
    info.add_argument("--kernel", type=int, choices=(1, 3), default=1, help="CSC dense conv kernel size (default 1)")
    info.add_argument("--json", action="store_true", help="print JSON with a top-level integer 'total'")
    args = parser.parse_args(argv)
    try:
        report = parameter_report(args.arch, args.tuner, args.down_ratio, args.kernel)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.tuner.upper()} tuner on {args.arch} ({report['skips']} skips: {report['skip_channels']})")
    for part, count in report["parts"].items():
        print(f"  {part:<20} {count:>14,}")
    print(f"  {'total':<20} {report['total']:>14,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
