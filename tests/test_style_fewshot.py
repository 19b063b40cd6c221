"""A style from a user's own pictures, end to end on the built-in model: pictures drawn here with PIL (not by the
Shapes renderer), no captions, the CLI's default settings, the file's default way of applying it. The full-length numbers are `bench/style_fewshot.py`'s (docs/training.md)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scedit_ui.cli import main
from scedit_ui.model_manager import ModelManager
from scedit_ui.request import GenerationRequest, TunerUse
from scedit_ui.shapes.checker import score_adherence, style_score
from scedit_ui.shapes.world import COLORS, caption, sample_scene

TRIGGER = "<sce>"
PROMPTS = 12


def hatched_drawing(seed: int, size: int = 128) -> Image.Image:
    """One filled ellipse or rectangle on a plain background, under half-transparent dark diagonal pen strokes 16 px apart."""
    rng = random.Random(seed)
    background, colour = rng.sample([name for name in COLORS if name not in ("black", "white")], 2)
    picture = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(picture)
    cx, cy, r = rng.uniform(40, 88), rng.uniform(40, 88), rng.uniform(18, 34)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=COLORS[colour])
    strokes = Image.new("L", picture.size, 0)
    pen = ImageDraw.Draw(strokes)
    for k in range(-size, 2 * size, 16):  # lines x + y = k
        pen.line([(k, 0), (k - size, size)], fill=110, width=3)
    return Image.composite(Image.new("RGB", picture.size, (20, 20, 20)), picture, strokes)


@pytest.fixture(scope="module")
def drawn_style_tuner(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my-drawings")
    for i in range(12):
        hatched_drawing(i).save(folder / f"drawing-{i:02d}.png")
    out = folder.parent / "my-style.safetensors"
    code = main(["train", "--kind", "sc", "--data", str(folder), "--trigger", TRIGGER, "--out", str(out),
                 "--preview-every", "0", "--work-dir", str(folder.parent / "run")])
    assert code == 0
    return out


def test_a_style_from_uncaptioned_drawings_shows_with_the_files_defaults_and_keeps_colours(drawn_style_tuner):
    manager = ModelManager("cpu")
    manager.load("")
    use = TunerUse.of_file(drawn_style_tuner)  # what `generate --tuner FILE` and picking it in Generate do
    base, styled = [], []
    for i in range(PROMPTS):
        scene = sample_scene(i, split="heldout")
        for images, uses in ((base, ()), (styled, (use,))):
            image = manager.generate(GenerationRequest(f"{TRIGGER} {caption(scene)}", seed=i, sc_tuners=uses)).images[0]
            images.append((style_score(image, "stripes"), score_adherence(image, scene).color_correct))
    training_style = np.mean([style_score(hatched_drawing(i), "stripes") for i in range(12)])
    base_style, styled_style = (np.mean([s for s, _ in images]) for images in (base, styled))
    base_colour, styled_colour = (np.mean([c for _, c in images]) for images in (base, styled))
    # Measured here on the 16,400-step base (the file asks for texture guidance 1.75): 0.74x of the drawings' own
    # style (base alone 0.00x), colour accuracy 0.76 (base alone 0.93); at 2, which the calibration took with a
    # limit of 0.15, 0.86x / 0.64. Its dark strokes cost more colour than the bench's hatching (docs/training.md):
    # the bound allows a quarter of the colour accuracy.
    assert styled_style >= 0.5 * training_style and styled_style >= base_style + 0.2, (base_style, styled_style, training_style)
    assert styled_colour >= base_colour - 0.25, (base_colour, styled_colour)
