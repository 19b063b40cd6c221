"""Composition: spatial α maps and per-skip α per condition, and step ranges as fractions of the sampling steps."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from test_tuners import randomise

from bench.region_mask import two_sided_picture
from scedit_ui.request import PNG_RECIPE_KEY, ConditionUse, GenerationRequest, SkipTuningSettings, request_from_png
from tuners import (
    SKIP_WEIGHT_PRESETS,
    ControlCondition,
    CSCTuner,
    SkipEditor,
    SkipLayout,
    TunerMetadata,
    save_tuner,
    skip_weight_preset,
)
from tuners.editor import step_is_active


def condition_image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def edited_skips(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The skip tensors each up block receives (after the editor's hook, which was registered first)."""
    layout = SkipLayout.from_unet(unet)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for b, block in enumerate(unet.up_blocks):
        def capture(module, args, kwargs, b=b):
            for g, x in zip(layout.up_block_skips[b], kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ())):
                seen[g] = x.clone()
        handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
    with torch.no_grad():
        unet(**inputs)
    for handle in handles:
        handle.remove()
    return seen


@pytest.fixture
def tuner(tiny_unet) -> CSCTuner:
    return randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))


def left_half_mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    return mask


def test_a_masked_condition_edits_each_skip_only_inside_its_resized_mask(tiny_unet, unet_inputs, tuner):
    with SkipEditor(tiny_unet) as editor:
        plain = edited_skips(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, condition_image(0), mask=left_half_mask())])
        masked = edited_skips(tiny_unet, unet_inputs)
    assert len(masked) == 12
    for g, x in masked.items():
        half = x.shape[-1] // 2
        if half == 0:  # a 1×1 skip straddles the edge: it gets the mask's mean, half the edit
            continue
        assert torch.equal(x[..., half:], plain[g][..., half:]), f"skip {g} changed outside the mask"
        assert not torch.allclose(x[..., :half], plain[g][..., :half]), f"skip {g} unchanged inside the mask"


def test_a_mask_of_ones_equals_no_mask_and_of_zeros_no_condition(tiny_unet, unet_inputs, tuner):
    with SkipEditor(tiny_unet) as editor:
        plain = tiny_unet(**unet_inputs).sample
        editor.set_conditions([ControlCondition(tuner, condition_image(0))])
        unmasked = tiny_unet(**unet_inputs).sample
        editor.set_conditions([ControlCondition(tuner, condition_image(0), mask=torch.ones(64, 64))])
        torch.testing.assert_close(tiny_unet(**unet_inputs).sample, unmasked)
        editor.set_conditions([ControlCondition(tuner, condition_image(0), mask=torch.zeros(64, 64))])
        torch.testing.assert_close(tiny_unet(**unet_inputs).sample, plain)
    assert not torch.allclose(unmasked, plain)


def test_a_soft_mask_keeps_its_mean_weight_at_every_skip(tiny_unet, unet_inputs, tuner):
    with SkipEditor(tiny_unet) as editor:
        plain = edited_skips(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, condition_image(0))])
        full = edited_skips(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, condition_image(0), mask=torch.full((64, 64), 0.25))])
        quarter = edited_skips(tiny_unet, unet_inputs)
    for g in range(12):
        torch.testing.assert_close(quarter[g] - plain[g], 0.25 * (full[g] - plain[g]))


def test_per_skip_weights_edit_only_the_chosen_skips(tiny_unet, unet_inputs, tuner):
    layout = SkipLayout.from_unet(tiny_unet)
    outer = skip_weight_preset(layout, "outer skips only")
    assert outer == (1.0,) * 3 + (0.0,) * 9  # skips 0-2 are at full latent size; skip 3 is a downsampler output
    with SkipEditor(tiny_unet) as editor:
        plain = edited_skips(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, condition_image(0), skip_weights=outer)])
        edited = edited_skips(tiny_unet, unet_inputs)
    changed = [g for g in range(12) if not torch.equal(edited[g], plain[g])]
    assert changed == [0, 1, 2]


def test_presets_cover_every_skip_once_between_outer_and_inner(tiny_unet):
    layout = SkipLayout.from_unet(tiny_unet)
    outer, inner = skip_weight_preset(layout, "outer skips only"), skip_weight_preset(layout, "inner skips only")
    assert [o + i for o, i in zip(outer, inner)] == list(skip_weight_preset(layout, "all skips"))
    assert set(SKIP_WEIGHT_PRESETS) == {"all skips", "outer skips only", "inner skips only"}
    with pytest.raises(ValueError, match="choose one of"):
        skip_weight_preset(layout, "middle")


def test_per_skip_weights_of_the_wrong_length_are_refused(tiny_unet, tuner):
    with SkipEditor(tiny_unet) as editor, pytest.raises(ValueError, match="need 12 values"):
        editor.set_conditions([ControlCondition(tuner, condition_image(0), skip_weights=(1.0,) * 9)])


@pytest.mark.parametrize(("mask", "message"), [(torch.ones(2, 64, 64), "height, width"), (torch.full((64, 64), 2.0), r"\[0, 1\]")])
def test_bad_masks_are_refused(tuner, mask, message):
    with pytest.raises(ValueError, match=message):
        ControlCondition(tuner, condition_image(0), mask=mask)


def test_step_ranges_follow_diffusers_controlnet_rule():
    # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end)
    assert [step_is_active((0.0, 0.5), i, 10) for i in range(10)] == [True] * 5 + [False] * 5
    assert [step_is_active((0.2, 1.0), i, 10) for i in range(10)] == [False] * 2 + [True] * 8
    assert [step_is_active((0.0, 1.0), i, 3) for i in range(3)] == [True] * 3


# -- through the model manager: step index from the pipeline, masks and per-skip α in requests ---------------------


def csc_tuner_file(manager, path, seed: int = 1, kind: str = "canny") -> str:
    tuner = randomise(CSCTuner(manager.editor.layout, 1, kind), seed)
    save_tuner(tuner, path, TunerMetadata.describe(tuner, "test"))
    return str(path)


def hint_picture() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))


@pytest.mark.parametrize(
    ("scheduler", "step_range", "active"),
    [("DPM++ 2M Karras", (0.0, 0.6), [True] * 6 + [False] * 4), ("Euler a", (0.05, 1.0), [False] + [True] * 9)],
)
def test_a_condition_step_range_counts_sampling_steps_not_timestep_values(manager, tmp_path, scheduler, step_range, active):
    tuner_file = csc_tuner_file(manager, tmp_path / "canny.safetensors")
    tuner = manager.tuner(tuner_file)
    calls: list[bool] = []
    handles = [
        manager.pipeline.unet.register_forward_pre_hook(lambda *_: calls.append(False)),
        tuner.lsc_tuner_blocks[0].tuner_op.register_forward_hook(lambda *_: calls.__setitem__(-1, True)),
    ]
    timesteps = []
    handles.append(manager.pipeline.unet.register_forward_pre_hook(lambda m, args: timesteps.append(float(args[1]))))
    try:
        request = GenerationRequest("a red circle", steps=10, scheduler=scheduler,
                                    conditions=(ConditionUse(tuner_file, hint_picture(), step_range=step_range),))
        manager.generate(request)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == active  # diffusers' ControlNet rule on the step index i of 10
    # Progress read from the timestep value (1 - t / 999) gives another answer on these schedules.
    by_timestep_value = [step_range[0] <= 1 - t / 999 <= step_range[1] for t in timesteps]
    assert by_timestep_value != active


def test_two_conditions_at_the_default_alpha_are_applied_at_0_6_each_and_say_so(manager, tmp_path):
    files = [csc_tuner_file(manager, tmp_path / f"canny{seed}.safetensors", seed) for seed in (1, 2)]

    def request(alpha: float, mode: str) -> GenerationRequest:
        uses = tuple(ConditionUse(f, hint_picture(), alpha) for f in files)
        return GenerationRequest("a red circle", steps=2, width=64, height=64, conditions=uses, alpha_mode=mode)

    result = manager.generate(request(1.0, "cap"))
    capped = result.images[0]
    assert any("α 1, 1 are applied as 0.6, 0.6" in notice for notice in result.notices)
    assert np.array_equal(np.asarray(capped), np.asarray(manager.generate(request(0.6, "raw")).images[0]))
    assert not np.array_equal(np.asarray(capped), np.asarray(manager.generate(request(1.0, "raw")).images[0]))
    assert capped.info["parameters"].count("(α 1.0 applied as 0.6, steps 0.0-1.0)") == 2
    assert request_from_png(capped)[0].alpha_mode == "cap"


def test_by_default_an_edge_condition_beside_colour_ends_at_0_85_of_the_steps_and_says_so(manager, tmp_path):
    canny, colour = csc_tuner_file(manager, tmp_path / "canny.safetensors", 1), csc_tuner_file(manager, tmp_path / "colour.safetensors", 2, "color")

    def request(canny_end: float, mode: str = "staged") -> GenerationRequest:
        uses = (ConditionUse(canny, hint_picture(), step_range=(0.0, canny_end)), ConditionUse(colour, hint_picture().rotate(90)))
        return GenerationRequest("a red circle", steps=20, width=64, height=64, conditions=uses, alpha_mode=mode)

    result = manager.generate(request(1.0))
    staged = np.asarray(result.images[0])
    assert any("canny.safetensors (canny) ends at 0.85 of the steps instead of 1" in notice for notice in result.notices)
    assert np.array_equal(staged, np.asarray(manager.generate(request(0.85, "raw")).images[0]))
    assert not np.array_equal(staged, np.asarray(manager.generate(request(1.0, "raw")).images[0]))
    assert "Conditions combined: staged" in result.images[0].info["parameters"]
    assert request_from_png(result.images[0])[0].conditions[0].step_range == (0.0, 1.0)  # as asked; the mode re-applies it


def test_a_recipe_from_before_the_alpha_modes_is_read_as_it_was_applied(manager, tmp_path):
    image = manager.generate(GenerationRequest("a red circle", steps=2, width=64, height=64)).images[0]
    recipe = json.loads(image.info[PNG_RECIPE_KEY])
    for normalise, mode in ((False, "raw"), (True, "normalise")):
        recipe["request"].pop("alpha_mode", None)
        recipe["request"]["normalise_alpha"] = normalise
        image.info[PNG_RECIPE_KEY] = json.dumps(recipe)
        assert request_from_png(image)[0].alpha_mode == mode


def test_skip_tuning_step_range_counts_sampling_steps(manager):
    plain = GenerationRequest("a red circle", steps=4, scheduler="DPM++ 2M Karras")
    seen = []
    hook = manager.pipeline.unet.up_blocks[-1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["res_hidden_states_tuple"][0].abs().sum())), with_kwargs=True)
    try:
        manager.generate(replace(plain, skip_tuning=SkipTuningSettings(0.5, 0.5, step_range=(0.5, 1.0))))
        scaled = list(seen)
        seen.clear()
        manager.generate(plain)
    finally:
        hook.remove()
    # The first two steps are identical to the plain run; the last two see ρ = 0.5 on every skip.
    assert scaled[:2] == seen[:2] and scaled[2] == pytest.approx(0.5 * seen[2], rel=1e-5)


# -- snags -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [128, 512])
def test_the_default_colour_map_has_8_cells_across_at_every_size(size):
    from scedit_ui.conditions import extract_condition

    gradient = np.tile(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, 1, 3))
    colour = np.asarray(extract_condition(Image.fromarray(gradient), "color", (size, size)))
    assert len(np.unique(colour[0, :, 0])) == 8  # was 2 at 128 px with a fixed 64 px cell


@pytest.fixture(scope="module")
def builtin_app(tmp_path_factory):
    """The app built (not launched) on the built-in tiny model, with the shipped tuners in its library."""
    import app

    root = tmp_path_factory.mktemp("builtin-app")
    args = app.build_parser().parse_args(["--device", "cpu", "--library", str(root / "library"), "--outputs", str(root / "outputs")])
    demo, state, _ = app.create_app(args)
    yield demo, state
    demo.close()


def _components(demo, kind):
    return [block for block in demo.blocks.values() if type(block).__name__ == kind]


def test_a_condition_row_preselects_the_shipped_tuner_made_for_its_kind(builtin_app):
    demo, state = builtin_app
    assert state.default_tuner("canny") == "canny" and state.default_tuner("color") == "colour"
    assert state.default_tuner("depth") is None  # no depth tuner ships: the row stays empty
    values = [block.value for block in _components(demo, "Dropdown") if block.label == "CSC tuner"]
    # One row per condition kind in Control, plus the Compare tab's canny default; only canny and colour ship.
    assert sorted(v for v in values if v) == ["canny", "canny", "colour", "inpaint"] and values.count(None) == len(values) - 4


def test_result_galleries_show_images_at_their_aspect_ratio(builtin_app):
    demo, _ = builtin_app
    galleries = _components(demo, "Gallery")
    assert len(galleries) >= 4 and all(gallery.object_fit == "contain" for gallery in galleries)


def test_a_photo_on_the_built_in_model_gets_one_line_on_what_it_draws(builtin_app, tmp_path):
    from scedit_ui.ui.control_tab import builtin_model_notice, example_pictures

    _, state = builtin_app
    notice = builtin_model_notice(state, str(tmp_path / "holiday.jpg"))
    assert "Shapes-world" in notice and "Model tab" in notice and notice.count("\n") == 0
    assert builtin_model_notice(state, example_pictures(state)[0]) == ""  # a shipped Shapes scene needs no warning
    assert builtin_model_notice(state, None) == ""


def test_a_region_mask_is_painted_or_uploaded_and_fitted_like_the_picture():
    from scedit_ui.ui.control_tab import fit_mask, region_mask

    picture = Image.new("RGB", (200, 100), (10, 120, 30))
    layer = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 100, 100))  # the left half painted
    painted = region_mask({"background": picture, "layers": [layer], "composite": picture}, picture)
    assert region_mask({"background": picture, "layers": [], "composite": picture}, picture) is None
    uploaded = Image.new("RGB", (200, 100), (0, 0, 0))
    uploaded.paste((255, 255, 255), (100, 0, 200, 100))
    assert np.asarray(region_mask({"background": uploaded, "layers": [], "composite": uploaded}, picture))[:, 150].min() == 255
    # "crop" keeps the centre square of the 2:1 picture: its left half is painted.
    fitted = np.asarray(fit_mask(painted, (64, 64), "crop"))
    assert fitted[:, :28].min() == 255 and fitted[:, 36:].max() == 0


# -- pixels: how far a region holds on the built-in model (bench/region_mask.py; numbers in docs/app.md) -----------

# Measured with the shipped canny tuner (`python bench/region_mask.py --seeds 4`; every base in docs/app.md). The
# pixel leak (every change right of the mask against the plain image) ran from a median of 0.19 (the v2 base) to 0.78
# (the 22,500-step base) and is 1.27 on the 27,700-step base: that base draws the prompt's unplaced circle at the top
# right by itself, masked canny draws it on the left, and the base's circle on the right goes (a change of the
# trajectory, not of what the condition draws there). What this test holds is what the mask is for: right of it the
# picture does not show what the unmasked condition draws there (kept_out median 0.87 measured; an ignored mask gives
# exactly 0), and inside it the condition's edges are kept (edge miss median -0.23 measured; a mask of zeros gives 1).
KEPT_OUT_TOLERANCE = 0.5
EDGE_MISS_TOLERANCE = 0.5
SEEDS = range(4)


def test_a_masked_condition_keeps_what_it_draws_out_of_the_other_half_and_its_edges_inside(builtin_app):
    from bench.region_mask import measure

    _, state = builtin_app
    results = [measure(state.manager, "canny", seed=seed, steps=8, size=128) for seed in SEEDS]
    kept_out = float(np.median([r["kept_out"] for r in results]))
    edge_miss = float(np.median([r["edge_miss"] for r in results]))
    assert kept_out > KEPT_OUT_TOLERANCE and edge_miss < EDGE_MISS_TOLERANCE, results


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_generate_takes_a_mask_and_per_skip_alpha_per_control(tmp_path, capsys):
    from scedit_ui.cli import main
    from scedit_ui.request import read_png_request

    picture, mask = tmp_path / "picture.png", tmp_path / "left.png"
    two_sided_picture(128).save(picture)
    Image.fromarray(np.where(np.arange(64)[None, :] < 32, 255, 0).repeat(64, 0).astype(np.uint8), "L").save(mask)
    out = tmp_path / "out.png"
    canny = "assets/tuners/canny.safetensors"
    code = main(["generate", "--prompt", "a yellow circle", "--steps", "2", "--size", "64x64", "--out", str(out),
                 "--control", f"{canny}:{picture}", "--mask", str(mask), "--skip-alpha", "inner skips only",
                 "--control", f"{canny}:{picture}:0.5", "--mask", "none", "--alpha-mode", "cap"])
    error = capsys.readouterr().err
    assert code == 0, error
    assert "note: the conditions' α 1, 0.5 are applied as 0.8, 0.4" in error  # the cap: Σα at most 1.2
    request, _, _ = read_png_request(out)
    first, second = request.conditions
    assert np.asarray(first.mask)[:, :30].min() == 255 and np.asarray(first.mask)[:, 34:].max() == 0
    assert first.skip_weights == (0.0,) * 3 + (1.0,) * 9 and second.mask is None and second.skip_weights is None
    assert request.alpha_mode == "cap"


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--skip-alpha", "middle"], "--skip-alpha 'middle' is neither a preset"), (["--mask", "a.png", "--mask", "b.png"], "--mask is given 2 times")],
)
def test_cli_generate_refuses_bad_composition_options_in_one_line(tmp_path, capsys, extra, message):
    from scedit_ui.cli import main

    picture = tmp_path / "picture.png"
    two_sided_picture(128).save(picture)
    code = main(["generate", "--prompt", "a", "--steps", "2", "--size", "64x64", "--out", str(tmp_path / "o.png"),
                 "--control", f"assets/tuners/canny.safetensors:{picture}", *extra])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
