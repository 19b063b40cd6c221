"""The metrics of bench/tuner_quality.py: what each counts, and what it leaves out."""

import numpy as np
from PIL import Image

from bench.tuner_quality import CAPTIONS, edge_f1, kept_pixel_error
from scedit_ui.shapes.checker import parse_prompt
from scedit_ui.shapes.world import sample_scene


def test_edge_f1_counts_edges_within_two_pixels_and_misses_beyond():
    reference = np.zeros((32, 32), bool)
    reference[10, 4:28] = True
    near, far = np.roll(reference, 2, axis=0), np.roll(reference, 4, axis=0)
    assert edge_f1(reference, reference) == 1.0
    assert edge_f1(reference, near) == 1.0
    assert edge_f1(reference, far) == 0.0
    assert edge_f1(reference, np.zeros_like(reference)) == 0.0


def test_kept_pixel_error_ignores_what_the_mask_lets_the_model_generate():
    render = Image.new("RGB", (16, 16), (200, 10, 10))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))  # the left half is generated
    generated = np.array(render)
    generated[:, :8] = (0, 255, 0)  # anything in the generated half
    assert kept_pixel_error(render, Image.fromarray(generated), mask) == 0.0
    generated[:, 8:] = (200, 10, 13)  # the kept half off by 3 in blue
    assert kept_pixel_error(render, Image.fromarray(generated), mask) == 3.0


def test_no_layout_captions_keep_shapes_colours_and_background_but_say_nothing_of_where():
    scenes = [sample_scene(i, split="heldout") for i in range(20)]
    assert any(shape.position is not None for scene in scenes for shape in scene.shapes)
    for scene in scenes:
        full, open_ = parse_prompt(CAPTIONS["full"](scene)), parse_prompt(CAPTIONS["no-layout"](scene))
        assert [(s.kind, s.color) for s in open_.shapes] == [(s.kind, s.color) for s in full.shapes]
        assert open_.background == full.background
        assert all(s.position is None and s.size is None for s in open_.shapes)
