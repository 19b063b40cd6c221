"""How far a region mask (spatial α map) holds in pixels, on the built-in tiny model with the shipped tuners.

    python bench/region_mask.py [--seeds 3] [--steps 8] [--size 128]

A two-sided picture (red left half with a yellow circle, blue right half with a green square) gives each
condition; its mask is the left half. For each seed, three images with the same settings: plain, with the
condition everywhere ("full") and with the left-half mask ("masked"). Printed per condition and seed:

  leak  mean |masked − plain| right of the mask ÷ mean |full − plain| there (1: the mask is ignored; 0: no leak)
  miss  mean |masked − full| inside the mask ÷ mean |full − plain| there (1: the condition is lost; 0: kept)

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

    def pixels(request: GenerationRequest) -> np.ndarray:
        return np.asarray(manager.generate(request).images[0], dtype=np.float32)

    base = pixels(plain)
    full = pixels(replace(plain, conditions=(ConditionUse(str(TUNERS[kind]), condition),)))
    masked = pixels(replace(plain, conditions=(ConditionUse(str(TUNERS[kind]), condition, mask=mask),)))
    inside, outside = np.s_[:, :half], np.s_[:, half:]
    return {
        "effect_inside": float(np.abs(full - base)[inside].mean()),
        "effect_outside": float(np.abs(full - base)[outside].mean()),
        "leak": float(np.abs(masked - base)[outside].mean() / np.abs(full - base)[outside].mean()),
        "miss": float(np.abs(masked - full)[inside].mean() / np.abs(full - base)[inside].mean()),
    }


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
