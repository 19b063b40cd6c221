"""The launched app through gradio_client: every public endpoint, on a random-weight SD folder (64 px, CPU)."""
from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from app_server import served_app
from diffusers import UNet2DConditionModel
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from scedit_ui.request import request_from_png
from scedit_ui.shapes.world import render_scene, sample_scene
from tuners import CSCTuner, SCTuner, SkipLayout, TunerMetadata, save_tuner
from tuners.validation import UserInputError

FAST = dict(steps=2, guidance=5.0, width=64, height=64, scheduler="DDIM")
PROMPT = "a red circle at the top left on a blue background"
PUBLIC_ENDPOINTS = {
    "/generate", "/read_png_settings", "/extract_conditions", "/control_generate", "/control_interpolate",
    "/skip_tuning_compare", "/rho_schedule", "/tuner_details", "/rename_tuner", "/delete_tuner", "/import_tuner",
    "/fetch_tuner", "/export_tuner_official",
    "/export_tuner", "/list_tuners", "/load_model", "/memory_options", "/train_start", "/train_cancel", "/train_resume",
    "/training_status", "/compare_grid",
}


def randomised(tuner, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuner.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return tuner


@pytest.fixture(scope="module")
def served(random_sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    library = root / "library"
    layout = SkipLayout.from_config(UNet2DConditionModel.load_config(random_sd_folder / "unet"))
    style = randomised(SCTuner(layout, 0.5), 1)
    save_tuner(style, library / "style.safetensors", TunerMetadata.describe(style, "test", trigger_word="zq"))
    edges = randomised(CSCTuner(layout, 1, "canny"), 2)
    save_tuner(edges, library / "edges.safetensors", TunerMetadata.describe(edges, "test"))
    pictures = []
    for seed in (1, 2):
        pictures.append(root / f"scene-{seed}.png")
        render_scene(sample_scene(seed), 128).save(pictures[-1])

    with served_app(random_sd_folder, root) as server:
        client = Client(server.url, verbose=False, download_files=str(root / "downloads"))
        yield SimpleNamespace(client=client, state=server.state, root=root, library=library, pictures=pictures, folder=random_sd_folder)


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def gallery_paths(gallery: list[dict]) -> list[str]:
    return [item["image"] for item in gallery]


def generate(client: Client, **overrides) -> tuple[list[str], str]:
    gallery, info = client.predict(**{"prompt": PROMPT, "negative_prompt": "", "seed": 5, "batch_size": 1, **FAST, **overrides}, api_name="/generate")
    return gallery_paths(gallery), info


def control_arguments(served, **overrides) -> dict:
    return {
        "picture": handle_file(str(served.pictures[0])), "condition_types": ["canny"], "fit": "crop", "prompt": PROMPT,
        "negative_prompt": "", "seed": 3, "alpha_mode": "cap", "canny_tuner": "edges", **FAST, **overrides,
    }


def test_every_public_endpoint_is_tested_here(served):
    assert set(served.client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == PUBLIC_ENDPOINTS


def test_the_app_binds_to_localhost_and_shares_nothing_by_default():
    args = app.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def test_generate_returns_pngs_that_carry_their_settings(served):
    (path,), info = generate(served.client, seed=5, batch_size=1)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        request, index, model = request_from_png(image)
    assert (request.prompt, request.seed, request.steps, index) == (PROMPT, 5, 2, 0)
    assert "seed 5" in info


def test_generate_batch_gives_consecutive_seeds(served):
    paths, info = generate(served.client, seed=9, batch_size=2)
    seeds = []
    for path in paths:
        with Image.open(path) as image:
            request, index, _ = request_from_png(image)
            seeds.append(request.seed + index)
    assert seeds == [9, 10] and "seeds 9–10" in info


def test_same_seed_gives_the_same_image_and_an_sc_tuner_changes_it(served):
    (first,), _ = generate(served.client)
    (again,), _ = generate(served.client)
    (tuned,), _ = generate(served.client, tuner_1="style", scale_1=1.0)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(tuned))


def test_seed_minus_one_draws_a_random_seed_and_reports_it(served):
    (path,), info = generate(served.client, seed=-1)
    with Image.open(path) as image:
        request, _, _ = request_from_png(image)
    assert f"seed {request.seed}" in info


def test_generate_refuses_bad_values_with_one_clear_message(served):
    with pytest.raises(AppError, match="width must be a multiple of 8"):
        generate(served.client, width=100)
    with pytest.raises(AppError, match="no tuner named 'missing'"):
        generate(served.client, tuner_1="missing")


def test_read_png_settings_restores_the_settings_of_that_image(served):
    paths, _ = generate(served.client, seed=20, batch_size=2, tuner_1="style", scale_1=0.5, conditional_only=True)
    settings = served.client.predict(handle_file(paths[1]), api_name="/read_png_settings")
    prompt, negative, seed, steps, guidance, width, height, scheduler, tuner_1, scale_1 = settings[:10]
    assert (prompt, seed, steps, width, height, scheduler, tuner_1, scale_1) == (PROMPT, 21, 2, 64, 64, "DDIM", "style", 0.5)
    assert settings[-2:] == (True, False)  # style guidance (the tuners on the conditional half only), not texture guidance
    paths, _ = generate(served.client, seed=20, tuner_1="style", scale_1=2.0, texture=True)
    settings = served.client.predict(handle_file(paths[0]), api_name="/read_png_settings")
    assert (settings[9], *settings[-2:]) == (2.0, False, True)  # slot 1's scale, texture guidance


def test_read_png_settings_of_a_foreign_png_explains_why(served):
    with pytest.raises(AppError, match="carries no SCEdit Studio metadata"):
        served.client.predict(handle_file(str(served.pictures[0])), api_name="/read_png_settings")


def test_extract_conditions_returns_one_image_per_chosen_type(served):
    previews = served.client.predict(handle_file(str(served.pictures[0])), ["canny", "color"], "crop", 64, 64, api_name="/extract_conditions")
    canny, color, *others = previews
    assert all(preview is None for preview in others)
    edges = pixels(canny)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert pixels(color).std() > 0


def test_changed_thresholds_give_a_different_condition(served):
    picture = handle_file(str(served.pictures[0]))
    loose = served.client.predict(picture, ["canny"], "crop", 64, 64, canny_low=10, canny_high=20, api_name="/extract_conditions")[0]
    strict = served.client.predict(picture, ["canny"], "crop", 64, 64, canny_low=600, canny_high=900, api_name="/extract_conditions")[0]
    assert pixels(loose).sum() > pixels(strict).sum()


def test_extract_outpaint_and_inpaint_with_a_random_mask(served):
    picture = handle_file(str(served.pictures[0]))
    previews = served.client.predict(picture, ["inpaint", "outpaint"], "crop", 64, 64, inpaint_seed=4, api_name="/extract_conditions")
    inpaint, outpaint = pixels(previews[2]), pixels(previews[3])
    assert (inpaint == 128).all(axis=2).any() and (outpaint[0] == 128).all()


def test_control_generate_uses_the_csc_tuner_and_shows_the_condition(served):
    gallery, info, *previews = served.client.predict(**control_arguments(served), api_name="/control_generate")
    (path,) = gallery_paths(gallery)
    with Image.open(path) as image:
        request, _, _ = request_from_png(image)
    assert len(request.conditions) == 1 and request.conditions[0].tuner.endswith("edges.safetensors") and "seed 3" in info
    assert previews[0] is not None and all(p is None for p in previews[1:])
    plain, _ = generate(served.client, seed=3)
    assert not np.array_equal(pixels(path), pixels(plain[0]))


def test_control_generate_without_a_tuner_names_the_condition(served):
    with pytest.raises(AppError, match="choose a CSC tuner for: canny"):
        served.client.predict(**control_arguments(served, canny_tuner=None), api_name="/control_generate")


def test_alpha_zero_gives_the_plain_image(served):
    gallery, *_ = served.client.predict(**control_arguments(served, canny_alpha=0.0), api_name="/control_generate")
    plain, _ = generate(served.client, seed=3)
    assert np.array_equal(pixels(gallery_paths(gallery)[0]), pixels(plain[0]))


def test_control_generate_takes_a_region_and_a_per_skip_preset_into_the_request(served, tmp_path):
    layer = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 64, 128))  # the left half painted
    layer.save(tmp_path / "region.png")
    picture = handle_file(str(served.pictures[0]))
    region = {"background": picture, "layers": [handle_file(str(tmp_path / "region.png"))], "composite": picture}
    gallery, *_ = served.client.predict(**control_arguments(served, canny_region=region, canny_skips="outer skips only"),
                                        api_name="/control_generate")
    request, _, _ = request_from_png(Image.open(gallery_paths(gallery)[0]))
    mask = np.asarray(request.conditions[0].mask)
    assert mask.shape == (64, 64) and mask[:, :28].min() == 255 and mask[:, 36:].max() == 0
    assert request.conditions[0].skip_weights == (1.0,) * 3 + (0.0,) * 9
    with pytest.raises(AppError, match="middle is not in the list of choices"):
        served.client.predict(**control_arguments(served, canny_skips="middle"), api_name="/control_generate")


def test_control_interpolate_gives_a_strip_from_one_picture_to_the_other(served):
    arguments = control_arguments(served, second_picture=handle_file(str(served.pictures[1])), strip_length=3)
    strip = served.client.predict(**arguments, api_name="/control_interpolate")
    assert [item["caption"] for item in strip] == ["blend 0.00", "blend 0.50", "blend 1.00"]
    first, middle, last = (pixels(item["image"]) for item in strip)
    assert not np.array_equal(first, last) and not np.array_equal(first, middle)


def test_control_interpolate_needs_a_second_picture(served):
    with pytest.raises(AppError, match="second picture"):
        served.client.predict(**control_arguments(served), api_name="/control_interpolate")


def test_skip_tuning_compare_rho_one_is_the_plain_image_and_lower_rho_is_not(served):
    base = dict(prompt=PROMPT, negative_prompt="", seed=4, use_freeu=False, s1=0.9, s2=0.2, b1=1.5, b2=1.6, **FAST)
    ones = {f"rho_{g}": 1.0 for g in range(12)}
    plain, same, _ = served.client.predict(**base, **ones, api_name="/skip_tuning_compare")
    assert np.array_equal(pixels(plain), pixels(same))
    plain, edited, summary = served.client.predict(**base, **{**ones, "rho_11": 0.5, "rho_10": 0.5}, api_name="/skip_tuning_compare")
    assert not np.array_equal(pixels(plain), pixels(edited)) and "ρ = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.5]" in summary


def test_skip_tuning_compare_with_freeu_changes_the_image(served):
    base = dict(prompt=PROMPT, negative_prompt="", seed=4, s1=0.9, s2=0.2, b1=1.5, b2=1.6, **FAST, **{f"rho_{g}": 1.0 for g in range(12)})
    plain, edited, summary = served.client.predict(**base, use_freeu=True, api_name="/skip_tuning_compare")
    assert not np.array_equal(pixels(plain), pixels(edited)) and "FreeU 0.9, 0.2, 1.5, 1.6" in summary


def test_rho_schedule_is_linear_from_outer_to_inner(served):
    rhos = served.client.predict(1.0, 0.45, api_name="/rho_schedule")
    assert rhos == pytest.approx([1.0 - 0.05 * g for g in range(12)], abs=1e-3)


def test_list_tuners_shows_kind_base_condition_and_fit(served):
    table, _ = served.client.predict(api_name="/list_tuners")
    rows = {row[0]: row for row in table["data"]}
    assert rows["style"][1:5] == ["sc", "test", "", "zq"] and rows["style"][7] == "yes"
    assert rows["edges"][1:4] == ["csc", "test", "canny"]


def test_tuner_details_show_the_metadata(served):
    details = served.client.predict("edges", api_name="/tuner_details")
    assert details["metadata"]["kind"] == "csc" and details["metadata"]["condition_type"] == "canny" and details["parameters"] > 0


def test_export_gives_the_tuner_file(served):
    exported = served.client.predict("style", api_name="/export_tuner")
    assert Path(exported).read_bytes() == (served.library / "style.safetensors").read_bytes()


def test_export_for_scepter_gives_a_zip_in_scepters_layout(served):
    import zipfile

    with zipfile.ZipFile(served.client.predict("edges", api_name="/export_tuner_official")) as archive:
        names = set(archive.namelist())
    assert {"0_SwiftSCETuning/configuration.json", "0_SwiftSCETuning/pytorch_model.bin", "scedit_studio.json"} == names


def test_fetch_offline_is_refused_with_what_to_download(served, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    before = sorted(served.library.glob("*"))
    with pytest.raises(AppError, match="Hub is off .*hf download scepter-studio/scepter_scedit --include 'release/canny_control/"):
        served.client.predict("scepter-studio/scepter_scedit", "release/canny_control", "", "", api_name="/fetch_tuner")
    assert sorted(served.library.glob("*")) == before


def test_import_rename_and_delete_stay_inside_the_library(served):
    source = served.library / "style.safetensors"
    name, status = served.client.predict([handle_file(str(source))], "../imported copy", "", api_name="/import_tuner")
    assert name == "imported_copy" and (served.library / "imported_copy.safetensors").is_file() and "imported" in status
    name, _ = served.client.predict("imported_copy", "../../escaped", api_name="/rename_tuner")
    assert name == "escaped" and (served.library / "escaped.safetensors").is_file()
    assert not list(served.root.glob("escaped*")) and not list(served.root.parent.glob("escaped*"))
    name, status = served.client.predict("escaped", api_name="/delete_tuner")
    assert name is None and not (served.library / "escaped.safetensors").exists() and "deleted" in status


def test_import_of_a_file_that_is_no_tuner_is_refused(served, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tuner")
    before = sorted(served.library.glob("*.safetensors"))
    with pytest.raises(AppError, match="not a tuner of this format|cannot import"):
        served.client.predict([handle_file(str(junk))], "", "", api_name="/import_tuner")
    assert sorted(served.library.glob("*.safetensors")) == before


def test_memory_options_switch_on_and_off(served):
    assert served.client.predict(True, False, api_name="/memory_options") == "attention slicing on, VAE tiling off"
    assert served.client.predict(False, False, api_name="/memory_options") == "attention slicing off, VAE tiling off"


def test_bad_upload_shows_an_error_and_the_app_keeps_serving(served, tmp_path):
    bad = tmp_path / "picture.png"
    bad.write_text("this is not a picture")
    with pytest.raises(AppError, match="picture is not an image that can be read"):
        served.client.predict(handle_file(str(bad)), ["canny"], "crop", 64, 64, api_name="/extract_conditions")
    previews = served.client.predict(handle_file(str(served.pictures[0])), ["canny"], "crop", 64, 64, api_name="/extract_conditions")
    assert previews[0] is not None


def train(client: Client, name: str, **overrides) -> str:
    arguments = dict(
        name=name, kind="sc", condition="canny", data_source="Shapes world", shapes_style="stripes", files=None, default_caption="",
        trigger="<sce>", remove_words="in stripes style", steps=2, learning_rate=1e-4, batch_size=1, resolution=64, preview_every=1, seed=0,
    )
    return client.predict(**{**arguments, **overrides}, api_name="/train_start")[0]


def wait_for_training(client: Client, timeout: float = 120) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")
        if status[1].startswith(("Finished", "Failed", "Cancelled")):
            return status
        time.sleep(0.5)
    raise AssertionError(f"training did not finish within {timeout} s")


def test_training_runs_in_the_background_and_the_tuner_lands_in_the_library(served):
    assert "Preparing trained_style" in train(served.client, "trained style")
    (path,), _ = generate(served.client)  # the app keeps serving while training runs
    progress, status, plot, previews, *_ = wait_for_training(served.client)
    assert status.startswith("Finished trained_style: 2 steps") and "step 2 / 2" in progress
    assert "; default use, measured on new prompts: scale " in status  # the Train tab calibrates as the CLI does
    assert [row[0] for row in plot["data"]] == [1, 2] and len(previews) == 2
    table, _ = served.client.predict(api_name="/list_tuners")
    trained = next(row for row in table["data"] if row[0] == "trained_style")
    assert trained[1] == "sc" and trained[4] == "<sce>"
    (tuned,), _ = generate(served.client, prompt="<sce> a red circle", tuner_1="trained_style")
    assert pixels(tuned).shape == (64, 64, 3)


def test_training_from_uploaded_images_with_captions(served, tmp_path):
    files = []
    for i, picture in enumerate(served.pictures):
        files.append(handle_file(str(picture)))
        (tmp_path / f"{picture.stem}.txt").write_text(f"caption {i}")
        files.append(handle_file(str(tmp_path / f"{picture.stem}.txt")))
    train(served.client, "from-uploads", data_source="My images", files=files, steps=1, preview_every=0)
    _, status, *_ = wait_for_training(served.client)
    assert status.startswith("Finished from-uploads: 1 steps")


def test_training_refuses_images_of_which_only_some_have_captions_before_starting(served, tmp_path):
    (tmp_path / f"{served.pictures[0].stem}.txt").write_text("a caption")
    files = [handle_file(str(p)) for p in (*served.pictures, tmp_path / f"{served.pictures[0].stem}.txt")]
    with pytest.raises(AppError, match="1 of 2 images .* have no caption"):
        train(served.client, "some-captions", data_source="My images", files=files)
    with pytest.raises(AppError, match="already exists"):
        train(served.client, "style")


def test_cancel_stops_a_training_without_adding_a_tuner(served):
    train(served.client, "cancelled-run", steps=5000, preview_every=0)
    served.client.predict(api_name="/train_cancel")
    _, status, *_ = wait_for_training(served.client)
    assert status.startswith("Cancelled") and not (served.library / "cancelled-run.safetensors").exists()
    assert served.client.predict(api_name="/train_cancel") == "no training is running"


def test_a_cancelled_training_resumes_from_its_checkpoint_and_continues_its_loss_curve(served):
    train(served.client, "resumed-run", steps=5000, preview_every=0)
    deadline = time.monotonic() + 60
    while not served.client.predict(api_name="/training_status")[2]["data"] and time.monotonic() < deadline:
        time.sleep(0.2)
    served.client.predict(api_name="/train_cancel")
    _, status, *_ = wait_for_training(served.client)
    done = int(re.match(r"Cancelled after (\d+) steps", status)[1])
    assert done >= 1
    with pytest.raises(AppError, match=f"has done {done} steps; set Steps above"):
        served.client.predict(done, api_name="/train_resume")
    assert served.client.predict(done + 2, api_name="/train_resume")[0].startswith("Resuming resumed-run")
    progress, status, plot, *_ = wait_for_training(served.client)
    assert status.startswith(f"Finished resumed-run: {done + 2} steps") and f"step {done + 2} / {done + 2}" in progress
    assert [row[0] for row in plot["data"]] == list(range(1, done + 3))
    assert (served.library / "resumed-run.safetensors").is_file()


def test_load_model_explains_a_bad_name_and_keeps_the_current_model(served):
    with pytest.raises(AppError, match="not found"):
        served.client.predict("no/such/model", "", api_name="/load_model")
    (path,), _ = generate(served.client)
    assert pixels(path).shape == (64, 64, 3)


def test_load_model_loads_another_base(served):
    summary = served.client.predict(str(served.folder), "", api_name="/load_model")
    assert "12 (8, 8, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32 channels)" in summary and "64 px" in summary


def test_inpaint_masks_exactly_the_painted_area(served, tmp_path):
    layer = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 64, 64))
    layer.save(tmp_path / "layer.png")
    picture = handle_file(str(served.pictures[0]))
    editor = {"background": picture, "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": picture}
    previews = served.client.predict(picture, ["inpaint"], "crop", 64, 64, inpaint_mask=editor, api_name="/extract_conditions")
    condition = pixels(previews[2])
    assert (condition[:32, :32] == 128).all() and not (condition[32:, 32:] == 128).all(axis=2).all()


# -- the plain functions behind the tabs -----------------------------------------------------------


def entry(name: str, kind: str, condition: str | None = None):
    from scedit_ui.tuner_library import TunerEntry

    metadata = TunerMetadata(kind=kind, base_architecture="test", skip_channels=(8,), skip_downsample=(False,), condition_type=condition)
    return TunerEntry(name, Path(f"{name}.safetensors"), False, 0, 0, metadata)


def test_loading_puts_an_sc_tuner_in_the_first_free_slot_and_a_csc_tuner_in_its_row():
    from scedit_ui.ui.tuners_tab import with_tuner

    assert with_tuner(entry("style", "sc"), ["a", None, None], ["canny"]) == (["a", "style", None], ["canny"], None)
    assert with_tuner(entry("depthy", "csc", "depth"), [None] * 3, ["seg", "canny"]) == ([None] * 3, ["canny", "depth", "seg"], "depth")
    with pytest.raises(UserInputError, match="slots of the Generate tab are taken"):
        with_tuner(entry("style", "sc"), ["a", "b", "c"], [])


def test_the_mask_is_the_union_of_the_painted_layers_and_nothing_painted_is_no_mask():
    from scedit_ui.ui.control_tab import mask_from_editor

    first, second = Image.new("RGBA", (4, 4), (0, 0, 0, 0)), Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    first.putpixel((0, 0), (255, 255, 255, 255))
    second.putpixel((3, 3), (255, 0, 0, 40))
    mask = np.asarray(mask_from_editor({"background": None, "layers": [first, second], "composite": None}))
    assert mask[0, 0] == mask[3, 3] == 255 and mask.sum() == 2 * 255
    assert mask_from_editor({"background": first, "layers": [Image.new("RGBA", (4, 4), (0, 0, 0, 0))], "composite": first}) is None


def test_seed_minus_one_is_random_and_a_fraction_is_refused():
    from scedit_ui.ui.generate_tab import pick_seed

    assert pick_seed(7) == 7 and 0 <= pick_seed(-1) <= 2**32 - 1
    with pytest.raises(UserInputError, match="whole number"):
        pick_seed(7.5)


def test_uploads_without_a_caption_file_get_the_default_caption(tmp_path):
    from scedit_ui.ui.train_tab import collect_uploads

    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "in" / name)
    (tmp_path / "in" / "a.txt").write_text("own caption")
    folder = collect_uploads([str(tmp_path / "in" / n) for n in ("a.png", "a.txt", "b.png")], "shared caption", tmp_path / "data")
    assert (folder / "a.txt").read_text() == "own caption" and (folder / "b.txt").read_text() == "shared caption"
    with pytest.raises(UserInputError, match="upload the training images"):
        collect_uploads([str(tmp_path / "in" / "a.txt")], "", tmp_path / "empty")


def test_the_shipped_example_pictures_are_the_scenes_their_prompts_describe():
    from scedit_ui.shapes.checker import score_adherence
    from scedit_ui.ui.control_tab import _example_prompt, example_pictures
    from scedit_ui.ui.state import AppState

    pictures = example_pictures(AppState(manager=None, library=None))
    assert len(pictures) == 3
    for path in pictures:
        adherence = score_adherence(Image.open(path), _example_prompt(path))
        assert adherence.overall == 1.0, (path, adherence)


def test_compare_grid_gives_a_labelled_grid_and_every_cell_with_its_settings(served):
    grid_path, cells, files, info = served.client.predict(
        prompt=PROMPT, negative_prompt="", seed=3, steps=2, guidance=5.0, width=64, height=64, scheduler="DDIM",
        sc_tuner="style", sc_scale=1.0, picture=None, kind="canny", csc_tuner=None, alpha=1.0, rho_inner=1.0,
        x_axis="SC scale", x_values="0, 1", y_axis="prompt S/R", y_values="red, green", api_name="/compare_grid",
    )
    with Image.open(grid_path) as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64 and "Grid: X: SC scale" in grid.info["parameters"]
    assert [caption for _, caption in ((c["image"], c["caption"]) for c in cells)] == [
        "SC scale 0 · red", "SC scale 1 · red", "SC scale 0 · green", "SC scale 1 · green"]
    request, _, _ = request_from_png(Image.open(files[4]))
    assert request.sc_tuners[0].scale == 1.0 and "green circle" in request.prompt
    assert "4 images" in info


def test_compare_grid_refuses_a_bad_axis_with_one_message(served):
    with pytest.raises(AppError, match="the SC scale axis varies SC tuner 1"):
        served.client.predict(
            prompt=PROMPT, negative_prompt="", seed=3, steps=2, guidance=5.0, width=64, height=64, scheduler="DDIM",
            sc_tuner=None, sc_scale=1.0, picture=None, kind="canny", csc_tuner=None, alpha=1.0, rho_inner=1.0,
            x_axis="SC scale", x_values="0, 1", api_name="/compare_grid",
        )
