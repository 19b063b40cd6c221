"""The metrics of bench/tuner_quality.py: what each counts, and what it leaves out."""

import numpy as np
from PIL import Image

from bench.tuner_quality import edge_f1, kept_pixel_error


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
