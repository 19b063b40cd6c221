"""Layout diversity of plain prompts: does a new seed give a new picture, or the same one again?

    python bench/layout_diversity.py [--model PATH] [--n 16] [--seeds 4] [--steps 20] [--guidance 5] [--json [PATH]]

For each of `--n` plain prompts of the Shapes world (one shape, no position: "a red circle on a white
background"; prompt i of `eval adherence --prompts plain`), `--seeds` images (seeds 100·i, 100·i + 1, …) are
made and the checker finds the cell of the largest shape in each. Reported: the mean number of distinct cells
among the seeds of a prompt (1: every seed draws the shape in the same cell; the seeds' count: all differ;
uniformly random cells over nine give 3.2 of 4) and the share of prompts whose seeds all share one cell.
A model that follows position words must still pick a cell by itself when none is named.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common  # noqa: E402

_common.set_threads()

from scedit_ui.model_manager import ModelManager  # noqa: E402
from scedit_ui.request import GenerationRequest  # noqa: E402
from scedit_ui.shapes.checker import detect_shapes  # noqa: E402
from scedit_ui.shapes.evaluation import prompt_for  # noqa: E402


def largest_shape_cell(image) -> str | None:
    shapes = detect_shapes(image)  # largest first
    return shapes[0].position if shapes else None


def run(model: str, n: int, seeds: int, steps: int, guidance: float) -> dict:
    manager = ModelManager("auto")
    info = manager.load(model)
    started = time.perf_counter()
    rows = []
    for i in range(n):
        prompt, _ = prompt_for("plain", i)
        cells = [
            largest_shape_cell(manager.generate(GenerationRequest(prompt, seed=100 * i + s, steps=steps, guidance=guidance)).images[0])
            for s in range(seeds)
        ]
        rows.append({"prompt": prompt, "cells": cells})
        print(f"{prompt}: {', '.join(str(c) for c in cells)}", file=sys.stderr, flush=True)
    distinct = [len(set(row["cells"])) for row in rows]
    return {
        "model": info.name, "prompts": n, "seeds": seeds, "steps": steps, "guidance": guidance,
        "mean_distinct_cells": statistics.fmean(distinct),
        "all_in_one_cell": sum(d == 1 for d in distinct) / n,
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="base model (default: the built-in tiny model)")
    parser.add_argument("--n", type=int, default=16, help="plain prompts")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    _common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.n < 1 or args.seeds < 2:
        parser.error("--n must be at least 1 and --seeds at least 2")
    result = run(args.model, args.n, args.seeds, args.steps, args.guidance)
    _common.report(result, args.json, print_summary)


def print_summary(result: dict) -> None:
    print(f"{result['model']}: {result['prompts']} plain prompts × {result['seeds']} seeds, {result['steps']} DDIM steps, "
          f"guidance {result['guidance']:g}: distinct cells {result['mean_distinct_cells']:.2f} of {result['seeds']}, "
          f"all in one cell {result['all_in_one_cell']:.2f} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
