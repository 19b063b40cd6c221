"""The Shapes world: deterministic scenes, held-out split, captions, rendering and styles."""

import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from scedit_ui.shapes.world import (
    BASE_STYLES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    TUNER_STYLES,
    Scene,
    ShapeSpec,
    apply_style,
    caption,
    is_held_out,
    make_dataset,
    plain_prompt,
    render_scene,
    sample_scene,
)
from tuners.validation import UserInputError


def _combos(scene: Scene):
    return [is_held_out(s.color, s.kind, scene.background, s.position) for s in scene.shapes]


def test_vocabulary_sizes():
    assert len(COLORS) >= 8
    assert SHAPES == ("circle", "square", "triangle", "star", "ring")
    assert SIZES == ("small", "medium", "large")
    assert len(POSITIONS) == 9
    assert len(STYLES) >= 3


def test_sample_scene_is_deterministic_by_seed():
    assert sample_scene(7) == sample_scene(7)
    assert len({sample_scene(s) for s in range(50)}) > 45


def test_scenes_have_distinct_positions_and_a_distinct_background():
    for seed in range(300):
        scene = sample_scene(seed, split="any", max_shapes=4)
        assert 1 <= len(scene.shapes) <= 4
        assert len({s.position for s in scene.shapes}) == len(scene.shapes)
        assert scene.background not in {s.color for s in scene.shapes}


def test_train_split_contains_no_held_out_combination():
    for seed in range(300):
        assert not any(_combos(sample_scene(seed, split="train")))


def test_heldout_split_contains_only_held_out_combinations():
    for seed in range(300):
        assert all(_combos(sample_scene(seed, split="heldout")))


def test_held_out_fraction_covers_every_colour_and_shape():
    combos = [
        (c, k, b, p)
        for c, k, b, p in itertools.product(COLORS, SHAPES, COLORS, POSITIONS)
        if b != c
    ]
    held = [combo for combo in combos if is_held_out(*combo)]
    assert 0.10 <= len(held) / len(combos) <= 0.15
    assert {c for c, *_ in held} == set(COLORS)
    assert {k for _, k, *_ in held} == set(SHAPES)


def test_caption_reads_as_a_sentence():
    scene = Scene(
        shapes=(ShapeSpec("circle", "red", "top left"), ShapeSpec("star", "blue", "center", "small")),
        background="yellow",
    )
    assert caption(scene) == "a red circle at the top left and a small blue star in the center on a yellow background"
    three = Scene(
        shapes=(
            ShapeSpec("ring", "orange", "top"),
            ShapeSpec("square", "green", "left", "large"),
            ShapeSpec("triangle", "white", "bottom right"),
        ),
        background="black",
        style="stripes",
    )
    assert caption(three) == (
        "an orange ring at the top, a large green square at the left and a white triangle at the "
        "bottom right on a black background, in stripes style"
    )


def test_free_form_captions_vary_the_wording_but_name_every_shape_and_the_background():
    scene = Scene(
        shapes=(ShapeSpec("circle", "grey", "center", "small"), ShapeSpec("star", "blue", "top left", "large")),
        background="grey",
    )
    texts = {caption(scene, random.Random(seed)) for seed in range(400)}
    assert len(texts) > 50
    assert all(("circle" in t and "star" in t and " background" in t) for t in texts)
    joined = " | ".join(texts)
    for phrase in ("gray", "grey", "centre", "center", "one ", "a blue star", "a large blue star", ", gray background",
                   "on a grey background", "star at the top left", "star in the top left"):
        assert phrase in joined, phrase
    assert any(t.startswith("a blue star") or t.startswith("one blue star") or t.startswith("a large") for t in texts)
    assert any("top left" not in t for t in texts)  # positions are sometimes left out
    assert caption(scene, random.Random(3)) == caption(scene, random.Random(3))


def test_plain_prompt_names_one_shape_and_the_background_only():
    scene = Scene((ShapeSpec("ring", "orange", "top right", "large"),), "grey")
    assert plain_prompt(scene) == "an orange ring on a grey background"


def test_base_and_tuner_styles_split_the_styles():
    assert set(BASE_STYLES) | set(TUNER_STYLES) == set(STYLES)
    assert not set(BASE_STYLES) & set(TUNER_STYLES)
    assert {"stripes", "polka dots"} <= set(TUNER_STYLES)


def test_a_scene_with_an_open_position_cannot_be_rendered():
    with pytest.raises(UserInputError, match="position or size"):
        render_scene(Scene((ShapeSpec("circle", "red", None),), "blue"))


def test_scene_dict_round_trip_is_json_safe():
    for seed in range(100):
        scene = sample_scene(seed, split="any", style=STYLES[seed % len(STYLES)] if seed % 2 else None)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_render_is_deterministic_rgb_of_the_requested_size():
    scene = sample_scene(3)
    a, b = render_scene(scene), render_scene(scene)
    assert a.mode == "RGB" and a.size == (128, 128)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert render_scene(scene, size=64).size == (64, 64)


def test_render_paints_background_and_shape_colours():
    scene = Scene(shapes=(ShapeSpec("square", "red", "center", "large"),), background="blue")
    a = np.asarray(render_scene(scene))
    assert tuple(a[2, 2]) == COLORS["blue"]
    assert tuple(a[64, 64]) == COLORS["red"]


def test_ring_has_a_background_coloured_hole():
    scene = Scene(shapes=(ShapeSpec("ring", "white", "center", "small"),), background="black")
    a = np.asarray(render_scene(scene))
    assert tuple(a[64, 64]) == COLORS["black"]
    assert (a[:, :, 0] > 200).sum() > 150


def test_shape_sizes_grow_with_the_size_class():
    areas = []
    for size in SIZES:
        a = np.asarray(render_scene(Scene((ShapeSpec("circle", "white", "center", size),), "black")))
        areas.append((a[..., 0] > 128).sum())
    assert areas[0] < areas[1] < areas[2]
    assert 300 < areas[0] and areas[2] < 1700


def test_styles_change_the_image_and_keep_its_size():
    scene = sample_scene(11)
    plain = np.asarray(render_scene(scene)).astype(int)
    for style in STYLES:
        styled = render_scene(Scene(scene.shapes, scene.background, style))
        assert styled.size == (128, 128)
        assert np.abs(np.asarray(styled).astype(int) - plain).mean() > 1
        assert np.array_equal(np.asarray(styled), np.asarray(apply_style(Image.fromarray(plain.astype(np.uint8)), style)))


def test_make_dataset_yields_matching_images_captions_and_scenes():
    items = list(make_dataset(5, seed=1, split="train"))
    assert len(items) == 5
    for image, text, scene in items:
        assert text == caption(scene)
        assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene)))
    assert [c for _, c, _ in make_dataset(3, seed=1)] == [c for _, c, _ in items[:3]]
    assert [c for _, c, _ in make_dataset(5, seed=2)] != [c for _, c, _ in items]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ShapeSpec("hexagon", "red", "center"),
        lambda: ShapeSpec("circle", "teal", "center"),
        lambda: ShapeSpec("circle", "red", "middle"),
        lambda: ShapeSpec("circle", "red", "center", "huge"),
        lambda: Scene((ShapeSpec("circle", "red", "center"),), background="mauve"),
        lambda: sample_scene(0, style="watercolour"),
        lambda: sample_scene(0, split="test"),
        lambda: apply_style(Image.new("RGB", (8, 8)), "cubism"),
    ],
)
def test_unknown_names_raise_user_input_error(make):
    with pytest.raises(UserInputError, match="choose one of"):
        make()
