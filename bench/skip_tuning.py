"""Skip-Tuning on the built-in tiny model: prompt adherence against DDIM steps for several ρ_inner.

    python bench/skip_tuning.py [--model PATH] [--n 50] [--steps 5,10,20] [--rho 1.0,0.9,0.8,0.7] [--json [PATH]]

Every cell generates the same `--n` held-out Shapes-world prompts with the same seeds (scene i, image
seed `--seed`+i, the scenes of `scedit_ui.shapes.evaluation.evaluate_adherence`), so cells differ only in steps
and ρ. ρ is linear from ρ_outer = 1 at the outermost skip to ρ_inner at the innermost, applied at every
step through `GenerationRequest.skip_tuning`. Each image is scored by the Shapes-world checker; the
adherence score is the mean of its five accuracies (colour, shape, position, count, background).
Differences to ρ = 1 are paired (same prompts and noise) and given with their standard error.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, replace

import _common  # noqa: E402

_common.set_threads()

from scedit_ui.model_manager import ModelManager  # noqa: E402
from scedit_ui.request import GenerationRequest, SkipTuningSettings  # noqa: E402
from scedit_ui.use_cases import measure_adherence  # noqa: E402

ACCURACIES = ("color_accuracy", "shape_accuracy", "position_accuracy", "count_accuracy", "background_accuracy")


class WithSkipTuning:
    """A model manager whose every request carries the given Skip-Tuning settings."""

    def __init__(self, manager: ModelManager, settings: SkipTuningSettings) -> None:
        self.manager = manager
        self.settings = settings

    def generate(self, request: GenerationRequest, *args, **kwargs):
        return self.manager.generate(replace(request, skip_tuning=self.settings), *args, **kwargs)


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), error


def run(model: str, n: int, seed: int, steps_list: list[int], rhos: list[float], guidance: float) -> dict:
    manager = ModelManager("auto")
    info = manager.load(model)
    started = time.perf_counter()
    # scores[steps][rho] = one dict of accuracies per image; evaluate_adherence with n=1 and seed+i is
    # image i of its n-image run, which keeps every image's score for the paired comparison.
    scores: dict[int, dict[float, list[dict]]] = {s: {r: [] for r in rhos} for s in steps_list}
    for i in range(n):
        for steps in steps_list:
            for rho in rhos:
                tuned = WithSkipTuning(manager, SkipTuningSettings(rho_outer=1.0, rho_inner=rho))
                report = measure_adherence(tuned.generate, GenerationRequest(prompt="", steps=steps, guidance=guidance), n=1, seed=seed + i)
                scores[steps][rho].append({k: getattr(report, k) for k in ACCURACIES})
        _common.log(f"prompt {i + 1}/{n} ({time.perf_counter() - started:.0f} s)")

    cells = []
    for steps in steps_list:
        reference = [statistics.fmean(s.values()) for s in scores[steps][rhos[0]]]
        for rho in rhos:
            overall = [statistics.fmean(s.values()) for s in scores[steps][rho]]
            mean, error = mean_and_error(overall)
            diff, diff_error = mean_and_error([a - b for a, b in zip(overall, reference)])
            cells.append({
                "steps": steps,
                "rho_inner": rho,
                "n": n,
                "adherence": round(mean, 4),
                "adherence_stderr": round(error, 4),
                f"difference_to_rho_{rhos[0]}": round(diff, 4),
                "difference_stderr": round(diff_error, 4),
                **{k: round(statistics.fmean(s[k] for s in scores[steps][rho]), 4) for k in ACCURACIES},
            })
    return {
        "benchmark": "skip_tuning",
        "machine": _common.machine(),
        "model": asdict(info),
        "setting": {
            "n": n, "seed": seed, "guidance": guidance, "scheduler": "DDIM", "rho_outer": 1.0,
            "prompts": "held-out Shapes-world scenes (scedit_ui.shapes.world.sample_scene(split='heldout'))",
            "score": "mean of the checker's colour, shape, position, count and background accuracies",
            "seconds": round(time.perf_counter() - started, 1),
        },
        "cells": cells,
    }


def print_table(result: dict) -> None:
    s, model = result["setting"], result["model"]
    print(f"Skip-Tuning on {model['name']}: adherence (mean of 5 accuracies) on {s['n']} held-out prompts, "
          f"DDIM, guidance {s['guidance']}, rho_outer 1 ({s['seconds']:.0f} s)")
    key = next(k for k in result["cells"][0] if k.startswith("difference_to_rho"))
    rows = [
        [c["steps"], f"{c['rho_inner']:.2f}", f"{c['adherence']:.3f} ± {c['adherence_stderr']:.3f}",
         f"{c[key]:+.3f} ± {c['difference_stderr']:.3f}",
         *(f"{c[k]:.2f}" for k in ACCURACIES)]
        for c in result["cells"]
    ]
    header = ["steps", "rho_inner", "adherence", key.replace("difference_to_", "vs "), "colour", "shape", "position", "count", "backgr."]
    print(_common.table(rows, header))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--model", default="", help="base model (default: the built-in tiny model)")
    parser.add_argument("--n", type=int, default=50, help="prompts per cell (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="5,10,20", help="comma-separated DDIM step counts (default 5,10,20)")
    parser.add_argument("--rho", default="1.0,0.9,0.8,0.7", help="comma-separated rho_inner values; the first is the reference")
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()
    steps_list = [int(x) for x in args.steps.split(",")]
    rhos = [float(x) for x in args.rho.split(",")]
    result = run(args.model, args.n, args.seed, steps_list, rhos, args.guidance)
    _common.report(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
