"""The checker reads Shapes-world images back: prompts, shapes, background, adherence, styles."""

import random
import re
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from scedit_ui.shapes.checker import (
    detect_background,
    detect_shapes,
    parse_prompt,
    score_adherence,
    style_score,
)
from scedit_ui.shapes.evaluation import PROMPT_SETS, evaluate_adherence
from scedit_ui.shapes.world import (
    COLORS,
    SHAPES,
    STYLES,
    Scene,
    ShapeSpec,
    caption,
    render_scene,
    sample_scene,
)
from tuners.validation import UserInputError


def _blur(image: Image.Image, sigma: float, noise: float, seed: int = 0) -> np.ndarray:
    a = cv2.GaussianBlur(np.asarray(image).astype(np.float32), (0, 0), sigma)
    a += np.random.default_rng(seed).normal(0, noise, a.shape)
    return a.clip(0, 255).astype(np.uint8)


def _unsized_medium(scene: Scene) -> Scene:
    """What a caption says: a medium shape's size is not written, so it parses as unnamed (None)."""
    return Scene(tuple(replace(s, size=None if s.size == "medium" else s.size) for s in scene.shapes), scene.background, scene.style)


def test_parse_prompt_inverts_caption():
    for seed in range(500):
        style = STYLES[seed % len(STYLES)] if seed % 3 == 0 else None
        scene = sample_scene(seed, split="any", style=style, max_shapes=4)
        assert parse_prompt(caption(scene)) == _unsized_medium(scene)


def test_parse_prompt_reads_every_free_form_caption():
    """Free-form captions leave positions and sizes out, but never misname what they do say."""
    for seed in range(500):
        style = STYLES[seed % len(STYLES)] if seed % 3 == 0 else None
        scene = sample_scene(seed, split="any", style=style, max_shapes=4)
        parsed = parse_prompt(caption(scene, random.Random(seed)))
        assert (parsed.background, parsed.style) == (scene.background, scene.style)
        assert len(parsed.shapes) == len(scene.shapes)
        truth = list(scene.shapes)
        # Most specific first, so a shape with an open position cannot take the match of a placed twin.
        for r in sorted(parsed.shapes, key=lambda s: (s.position is None, s.size is None)):
            match = next(
                t for t in truth
                if (t.kind, t.color) == (r.kind, r.color) and r.position in (None, t.position) and r.size in (None, t.size)
            )
            truth.remove(match)


def test_parse_prompt_tolerates_case_spacing_and_a_period():
    scene = parse_prompt("A Small  Blue star in the centre on an orange background.")
    assert scene == Scene((ShapeSpec("star", "blue", "center", "small"),), "orange")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a gray square on a white background", Scene((ShapeSpec("square", "grey", None, None),), "white")),
        ("One grey ring, black background", Scene((ShapeSpec("ring", "grey", None, None),), "black")),
        ("a red circle in the middle on blue background", Scene((ShapeSpec("circle", "red", "center", None),), "blue")),
        (
            "a large yellow star top-left, and a cyan triangle on the right on a gray background",
            Scene((ShapeSpec("star", "yellow", "top left", "large"), ShapeSpec("triangle", "cyan", "right", None)), "grey"),
        ),
        (
            "a pink circle and one small green square at the bottom on a black background, in pixelate style",
            Scene((ShapeSpec("circle", "pink", None, None), ShapeSpec("square", "green", "bottom", "small")), "black", "pixelate"),
        ),
    ],
)
def test_parse_prompt_reads_prompts_as_people_write_them(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_unnamed_positions_are_not_scored():
    image = render_scene(Scene((ShapeSpec("star", "red", "top left", "large"),), "white"))
    plain = score_adherence(image, "a red star on a white background")
    assert plain.position_correct is None
    assert (plain.color_correct, plain.shape_correct, plain.count_correct, plain.background_correct) == (1.0, 1.0, True, True)
    assert plain.overall == 1.0
    mixed = score_adherence(image, "a red star and a blue circle at the bottom on a white background")
    assert mixed.position_correct == 0.0  # only the blue circle names a cell, and it is missing


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat on a sofa",
        "a red hexagon at the top on a blue background",
        "a teal circle at the top on a blue background",
        "a red circle somewhere on a blue background",
        "a red circle at the top on a blue background, in cubism style",
        "a red circle at the top",
        "red circle at the top on a blue background",
    ],
)
def test_parse_prompt_rejects_what_it_cannot_read(prompt):
    with pytest.raises(UserInputError):
        parse_prompt(prompt)


def test_detects_the_background_of_renders():
    for background in COLORS:
        shape_color = "white" if background != "white" else "black"
        scene = Scene((ShapeSpec("square", shape_color, "center", "large"),), background)
        assert detect_background(render_scene(scene)) == background


def test_detects_every_kind_colour_and_cell():
    scene = Scene(
        shapes=(
            ShapeSpec("circle", "red", "top left", "small"),
            ShapeSpec("square", "blue", "top right", "small"),
            ShapeSpec("triangle", "white", "center", "medium"),
            ShapeSpec("star", "black", "bottom left", "medium"),
            ShapeSpec("ring", "purple", "bottom right", "small"),
        ),
        background="green",
    )
    found = {(d.kind, d.color, d.position) for d in detect_shapes(render_scene(scene))}
    assert found == {(s.kind, s.color, s.position) for s in scene.shapes}


def test_clean_renders_score_near_perfect_over_300_scenes():
    shapes = color = kind = position = 0.0
    backgrounds = counts = 0
    for seed in range(300):
        scene = sample_scene(50_000 + seed, split="any")
        a = score_adherence(render_scene(scene), caption(scene))
        k = len(scene.shapes)
        shapes += k
        color += a.color_correct * k
        kind += a.shape_correct * k
        position += a.position_correct * k
        backgrounds += a.background_correct
        counts += a.count_correct
    assert color / shapes >= 0.98
    assert kind / shapes >= 0.95
    assert position / shapes >= 0.98
    assert backgrounds == 300
    assert counts >= 295


def test_mildly_blurred_noisy_renders_still_score_high():
    shapes = color = kind = 0.0
    for seed in range(60):
        scene = sample_scene(60_000 + seed, split="any")
        a = score_adherence(_blur(render_scene(scene), 1.0, 5, seed), scene)
        k = len(scene.shapes)
        shapes, color, kind = shapes + k, color + a.color_correct * k, kind + a.shape_correct * k
    assert color / shapes >= 0.95
    assert kind / shapes >= 0.9


def test_wrong_colour_scores_low():
    prompt = Scene((ShapeSpec("circle", "red", "center"),), "white")
    image = render_scene(Scene((ShapeSpec("circle", "blue", "center"),), "white"))
    a = score_adherence(image, prompt)
    assert a.color_correct == 0.0 and a.shape_correct == 0.0
    assert a.background_correct and a.count_correct


@pytest.mark.parametrize("kind", SHAPES)
def test_wrong_shape_scores_low(kind):
    other = SHAPES[(SHAPES.index(kind) + 1) % len(SHAPES)]
    image = render_scene(Scene((ShapeSpec(other, "yellow", "left", "large"),), "blue"))
    a = score_adherence(image, Scene((ShapeSpec(kind, "yellow", "left", "large"),), "blue"))
    assert a.color_correct == 1.0
    assert a.shape_correct == 0.0


def test_wrong_background_position_and_count_are_reported():
    image = render_scene(Scene((ShapeSpec("star", "pink", "top left", "large"),), "black"))
    a = score_adherence(image, "a pink star at the bottom right and a green ring at the top on a cyan background")
    assert not a.background_correct
    assert not a.count_correct
    assert a.position_correct == 0.0
    assert a.color_correct == 0.5
    assert a.overall < 0.3


def test_blank_image_detects_nothing():
    assert detect_shapes(Image.new("RGB", (128, 128), COLORS["green"])) == []


@pytest.mark.parametrize("style", STYLES)
def test_style_score_separates_styled_from_plain_renders(style):
    plain, styled = [], []
    for seed in range(12):
        scene = sample_scene(70_000 + seed, split="any")
        plain.append(style_score(render_scene(scene), style))
        styled.append(style_score(render_scene(Scene(scene.shapes, scene.background, style)), style))
    assert all(0.0 <= v <= 1.0 for v in plain + styled)
    assert min(styled) > 0.5
    assert np.mean(plain) < 0.15
    assert min(styled) > max(plain)


def test_style_score_rejects_unknown_styles():
    with pytest.raises(UserInputError, match="choose one of"):
        style_score(Image.new("RGB", (64, 64)), "cubism")


def test_each_clause_is_scored_for_its_cell_in_the_prompts_order():
    """The first-named shape in its cell, the second in the wrong one, and one shape nobody asked for."""
    drawn = Scene(
        (
            ShapeSpec("square", "red", "top left", "medium"),
            ShapeSpec("circle", "blue", "bottom right", "medium"),
            ShapeSpec("star", "yellow", "center", "medium"),
        ),
        "white",
    )
    prompt = "a red square at the top left and a blue circle at the top right on a white background"
    a = score_adherence(render_scene(drawn), prompt)
    assert a.cells_correct == (True, False)
    assert a.position_correct == 0.5
    assert a.extra_blobs == 1
    assert score_adherence(render_scene(drawn), "a red square on a white background").cells_correct == (None,)


def test_unmatched_blobs_are_told_apart_as_fragments_copies_and_strays():
    """A red square with a piece broken off beside it and a yellow smudge in it, a second red square, and a green
    one nobody asked for."""
    a = np.full((128, 128, 3), 255, np.uint8)
    a[10:40, 10:40] = COLORS["red"]  # the prompted square, top left
    a[20:30, 20:30] = COLORS["yellow"]  # inside it, as a ring's hole filled with another colour
    a[10:40, 42:50] = COLORS["red"]  # 2 px from it: a piece of it
    a[90:120, 90:120] = COLORS["red"]  # bottom right: a second copy
    a[90:120, 10:40] = COLORS["green"]  # bottom left: a colour the prompt does not name
    score = score_adherence(Image.fromarray(a), "a red square at the top left on a white background")
    assert (score.fragments, score.copies, score.strays) == (2, 1, 1)
    assert score.extra_blobs == 4 and score.position_correct == 1.0
    clean = score_adherence(render_scene(sample_scene(3, split="heldout")), caption(sample_scene(3, split="heldout")))
    assert (clean.fragments, clean.copies, clean.strays) == (0, 0, 0)


def test_evaluation_reports_position_by_clause_over_prompts_of_several_shapes():
    def second_shape_moved(prompt: str, seed: int) -> Image.Image:
        scene = sample_scene(seed, split="heldout")
        if len(scene.shapes) > 1:
            second = scene.shapes[1]
            elsewhere = "top left" if second.position == "bottom right" else "bottom right"
            scene = replace(scene, shapes=(scene.shapes[0], replace(second, position=elsewhere), *scene.shapes[2:]))
        return render_scene(scene)

    report = evaluate_adherence(second_shape_moved, n=24, seed=5)
    first, second = report.clause_position_accuracy[:2]
    assert first >= 0.9 and second <= 0.2
    assert abs(report.extra_blobs) < 0.2


@pytest.mark.parametrize("prompts", PROMPT_SETS)
def test_evaluation_prompt_sets_score_their_own_scenes_as_right(prompts):
    """A generator that draws exactly the prompted scene scores (near) 1 on every metric the set measures."""
    split, max_shapes = ("heldout", 3) if prompts == "heldout" else ("any", 1)
    seen = []

    def draw(prompt: str, seed: int) -> Image.Image:
        seen.append(prompt)
        return render_scene(sample_scene(seed, split=split, max_shapes=max_shapes))

    report = evaluate_adherence(draw, n=12, seed=5, prompts=prompts)
    assert report.color_accuracy == report.shape_accuracy == report.background_accuracy == 1.0
    assert report.count_accuracy >= 11 / 12
    if prompts == "plain":
        assert report.position_accuracy is None
        assert all(re.fullmatch(r"an? [a-z]+ [a-z]+ on an? [a-z]+ background", p) for p in seen), seen
    else:
        assert report.position_accuracy == 1.0 and all(" at the " in p or " in the center" in p for p in seen)


def test_evaluation_rejects_an_unknown_prompt_set():
    with pytest.raises(UserInputError, match="heldout, plain"):
        evaluate_adherence(lambda prompt, seed: Image.new("RGB", (8, 8)), n=1, prompts="fancy")
