"""How far a region mask (spatial α map) holds in pixels, on the built-in tiny model with the shipped tuners.

    python bench/region_mask.py [--seeds 3] [--steps 8] [--size 128]

A two-sided picture (red left half with a yellow circle, blue right half with a green square) gives each
condition; its mask is the left half. For each seed, three images with the same settings: plain, with the
condition everywhere ("full") and with the left-half mask ("masked"). Printed per condition and seed:

  leak      mean |masked − plain| right of the mask ÷ mean |full − plain| there (1: the mask is ignored; 0: no leak)
  miss      mean |masked − full| inside the mask ÷ mean |full − plain| there (1: the condition is lost; 0: kept)
  kept_out  mean |masked − full| right of the mask ÷ mean |plain − full| there (0: the mask is ignored; 1: the right
            half is as far from what the condition draws there as the plain image is)

Leak counts every change right of the mask, also the base's own: where the prompt names no positions, a condition
that draws a shape inside the mask can move the base's copy of it out of the other half (a base that draws "a yellow
circle" at the top right by itself loses that circle when masked canny draws it on the left; docs/app.md). kept_out
asks only whether the right half shows what the unmasked condition draws there.

and for canny the same in edges, since what canny asks for is its edges, not the colours (a canny tuner that turns
a background the prompt leaves open grey everywhere moves every pixel's colour; masked, the background stays the
base's inside the mask too, and the pixel miss counts that as lost though the edges are kept): with F1 (2 px) of
each half's Canny edges against the condition's,

  edge_leak  F1 masked − F1 plain right of the mask (0: no condition edges there; a difference, not a ratio: the
             full condition itself may follow the right half's edges no better than the base)
  edge_miss  (F1 full − F1 masked) ÷ (F1 full − F1 plain) inside the mask (1: the edges are lost; 0: kept)

The mask is exact at every skip (tests/test_composition.py); what reaches the other half goes through the
decoder (3×3 convs at 2×2 and 4×4 latents, global self-attention) and the sampling trajectory.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from scedit_ui.conditions import ConditionRequest, extract
from scedit_ui.model_manager import ASSETS, ModelManager
from scedit_ui.request import ConditionUse, GenerationRequest
from tuner_quality import canny_edges, edge_f1  # bench/ is on the path: run as a script, and in pytest (pyproject)

TUNERS = {"canny": ASSETS / "tuners" / "canny.safetensors", "color": ASSETS / "tuners" / "colour.safetensors"}
PROMPT = "a yellow circle and a green square"


def two_sided_picture(size: int) -> Image.Image:
    picture = Image.new("RGB", (128, 128), (40, 60, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, 63, 127), fill=(200, 40, 40))
    draw.ellipse((12, 40, 52, 80), fill=(240, 220, 30))
    draw.rectangle((78, 44, 114, 80), fill=(30, 200, 60))
    return picture.resize((size, size), Image.Resampling.NEAREST)


def measure(manager: ModelManager, kind: str, seed: int, steps: int, size: int) -> dict[str, float]:
    condition = extract(two_sided_picture(size), ConditionRequest(kind, (size, size))).image
    half = size // 2
    mask = Image.fromarray(np.where(np.arange(size)[None, :] < half, 255, 0).repeat(size, 0).astype(np.uint8), "L")
    plain = GenerationRequest(PROMPT, seed=seed, steps=steps, width=size, height=size)

    images = [manager.generate(request).images[0] for request in (
        plain,
        replace(plain, conditions=(ConditionUse(str(TUNERS[kind]), condition),)),
        replace(plain, conditions=(ConditionUse(str(TUNERS[kind]), condition, mask=mask),)),
    )]
    base, full, masked = (np.asarray(image, dtype=np.float32) for image in images)
    inside, outside = np.s_[:, :half], np.s_[:, half:]
    effect = np.abs(full - base)  # the unmasked condition's change: every ratio's denominator
    effect_inside, effect_outside = float(effect[inside].mean()), float(effect[outside].mean())
    measured = {
        "effect_inside": effect_inside,
        "effect_outside": effect_outside,
        "leak": float(np.abs(masked - base)[outside].mean()) / effect_outside,
        "miss": float(np.abs(masked - full)[inside].mean()) / effect_inside,
        "kept_out": float(np.abs(masked - full)[outside].mean()) / effect_outside,
    }
    if kind == "canny":
        wanted = np.asarray(condition)[..., 0] > 0
        f1 = {
            side: [edge_f1(wanted[half_slice], canny_edges(image)[half_slice]) for image in images]
            for side, half_slice in (("inside", inside), ("outside", outside))
        }
        (plain_in, full_in, masked_in), (plain_out, _, masked_out) = f1["inside"], f1["outside"]
        measured.update({
            "f1_inside_plain_full_masked": f1["inside"], "f1_outside_plain_full_masked": f1["outside"],
            "edge_leak": masked_out - plain_out,
            "edge_miss": (full_in - masked_in) / (full_in - plain_in),
        })
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    manager = ModelManager("cpu")
    manager.load("")
    for kind in TUNERS:
        for seed in range(args.seeds):
            print(json.dumps({"condition": kind, "seed": seed, **measure(manager, kind, seed, args.steps, args.size)}), flush=True)


if __name__ == "__main__":
    main()
