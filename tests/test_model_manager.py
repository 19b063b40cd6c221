"""ModelManager and the generation API on a random-weight SD pipeline folder (64 px, CPU)."""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from scedit_ui.model_manager import GenerationCancelled, ModelManager, resolve_source
from scedit_ui.request import (
    SCHEDULERS,
    ConditionUse,
    GenerationRequest,
    SkipTuningSettings,
    TunerUse,
    request_from_png,
    save_png,
)
from tuners import CSCTuner, SCTuner, TunerMetadata, save_tuner
from tuners.validation import UserInputError

FAST = dict(steps=2, guidance=5.0)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def randomised_tuner_file(tuner, path, seed=0, **metadata):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuner.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    save_tuner(tuner, path, TunerMetadata.describe(tuner, "test", **metadata))
    return str(path)


def test_loads_a_diffusers_folder_and_reports_its_layout(manager):
    info = manager.info()
    assert info.num_skips == 12 and info.native_size == 64 and info.device == "cpu" and info.dtype == "float32"


def test_same_request_gives_the_same_pixels_and_another_seed_does_not(manager):
    request = GenerationRequest("a red circle at the top left on a blue background", seed=7, **FAST)
    first, again = manager.generate(request).images[0], manager.generate(request).images[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(manager.generate(replace(request, seed=8)).images[0]))


def test_png_metadata_recreates_the_image_exactly(manager, tmp_path):
    request = GenerationRequest("a green star", negative_prompt="blurry", seed=11, batch_size=2, scheduler="Euler a",
                                skip_tuning=SkipTuningSettings(1.0, 0.8), **FAST)
    images = manager.generate(request).images
    save_png(images[1], tmp_path / "b.png")
    loaded = Image.open(tmp_path / "b.png")
    assert "Negative prompt: blurry" in loaded.info["parameters"] and "Seed: 12" in loaded.info["parameters"]
    stored, index, model = request_from_png(loaded)
    assert index == 1 and stored == replace(request, width=64, height=64)
    recreated = manager.generate(stored).images[index]
    assert np.array_equal(pixels(recreated), pixels(loaded))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_generates(manager, scheduler):
    image = manager.generate(GenerationRequest("a ring", scheduler=scheduler, **FAST)).images[0]
    assert image.size == (64, 64) and pixels(image).std() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scheduler": "PLMS++"}, "unknown scheduler"),
        ({"width": 0}, "width must be a whole number from"),
        ({"height": -64}, "height must be a whole number from"),
        ({"width": 100}, "multiple of 8"),
        ({"steps": 0}, "steps must be a whole number from"),
        ({"steps": 10_000}, "steps must be a whole number from"),
        ({"guidance": float("nan")}, "guidance must be a number from 0 to 30"),
        ({"guidance": 99.0}, "guidance must be a number from"),
        ({"batch_size": 0}, "batch size must be a whole number from"),
        ({"seed": -1}, "seed must be a whole number from"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"alpha_mode": "sum"}, "α mode must be one of staged, cap, normalise, raw"),
    ],
)
def test_bad_input_is_refused_before_any_work(manager, monkeypatch, change, message):
    monkeypatch.setattr(manager, "_run_pipeline", lambda *a: pytest.fail("the pipeline ran"))
    with pytest.raises(UserInputError, match=message):
        manager.generate(replace(GenerationRequest("a square", **FAST), **change))
    assert not manager.lock.locked()


def test_over_long_prompt_is_truncated_with_a_notice(manager):
    result = manager.generate(GenerationRequest(" ".join(["a red circle"] * 40), **FAST))
    assert len(result.images) == 1
    assert any("only the first 77" in notice for notice in result.notices)


def test_tuners_conditions_and_rho_change_the_image(manager, tmp_path):
    layout = manager.editor.layout
    plain = GenerationRequest("a blue square", seed=5, **FAST)
    baseline = pixels(manager.generate(plain).images[0])
    sc_file = randomised_tuner_file(SCTuner(layout, 0.5), tmp_path / "style.safetensors")
    csc_file = randomised_tuner_file(CSCTuner(layout, 1, "canny"), tmp_path / "canny.safetensors", seed=1)
    hint = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    variants = {
        "sc": replace(plain, sc_tuners=(TunerUse(sc_file, 1.0),)),
        "csc": replace(plain, conditions=(ConditionUse(csc_file, hint, 1.0),)),
        "rho": replace(plain, skip_tuning=SkipTuningSettings(1.0, 0.5)),
    }
    for name, request in variants.items():
        assert not np.array_equal(pixels(manager.generate(request).images[0]), baseline), name
    # Every edit is removed after each generation.
    assert np.array_equal(pixels(manager.generate(plain).images[0]), baseline)


def test_a_conditional_only_tuner_differs_only_under_guidance_and_is_kept_in_the_png(manager, tmp_path):
    sc_file = randomised_tuner_file(SCTuner(manager.editor.layout, 0.5), tmp_path / "style.safetensors")
    both = GenerationRequest("a blue square", seed=5, sc_tuners=(TunerUse(sc_file, 1.0),), **FAST)
    conditional = replace(both, sc_tuners=(TunerUse(sc_file, 1.0, conditional_only=True),))
    image = manager.generate(conditional).images[0]
    assert not np.array_equal(pixels(image), pixels(manager.generate(both).images[0]))
    assert not manager.editor.guidance_halves  # reset with the other edits
    unguided = [manager.generate(replace(r, guidance=1.0)).images[0] for r in (both, conditional)]
    assert np.array_equal(pixels(unguided[0]), pixels(unguided[1]))  # one half only: the same edit
    save_png(image, tmp_path / "c.png")
    stored, _, _ = request_from_png(Image.open(tmp_path / "c.png"))
    assert stored.sc_tuners[0].conditional_only
    assert "style guidance" in Image.open(tmp_path / "c.png").info["parameters"]
    with pytest.raises(UserInputError, match="conditional_only of style.safetensors must be true or false"):
        manager.generate(replace(both, sc_tuners=(TunerUse(sc_file, 1.0, conditional_only="yes"),)))


def test_texture_guidance_changes_the_image_is_kept_in_the_png_and_excludes_style_guidance(manager, tmp_path):
    sc_file = randomised_tuner_file(SCTuner(manager.editor.layout, 0.5, kernel_size=3), tmp_path / "style.safetensors")
    plain = manager.generate(GenerationRequest("a blue square", seed=5, **FAST)).images[0]
    texture = GenerationRequest("a blue square", seed=5, sc_tuners=(TunerUse(sc_file, 2.0, texture=True),), **FAST)
    image = manager.generate(texture).images[0]
    assert not np.array_equal(pixels(image), pixels(plain))
    off = manager.generate(replace(texture, sc_tuners=(TunerUse(sc_file, 0.0, texture=True),))).images[0]
    assert np.array_equal(pixels(off), pixels(plain))  # strength 0: no extra rows, the base's image
    save_png(image, tmp_path / "t.png")
    assert request_from_png(Image.open(tmp_path / "t.png"))[0].sc_tuners == (TunerUse(sc_file, 2.0, texture=True),)
    assert "texture guidance" in Image.open(tmp_path / "t.png").info["parameters"]
    with pytest.raises(UserInputError, match="choose style guidance or texture guidance, not both"):
        manager.generate(replace(texture, sc_tuners=(TunerUse(sc_file, 1.0, conditional_only=True, texture=True),)))


def test_a_cancelled_generation_releases_the_lock(manager):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        manager.generate(GenerationRequest("a star", **FAST), cancel=cancel)
    assert not manager.lock.locked()
    assert manager.generate(GenerationRequest("a star", **FAST)).images


def test_progress_reports_every_step(manager):
    seen = []
    manager.generate(GenerationRequest("a star", steps=3), progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_missing_models_explain_what_was_tried(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="not found"):
        resolve_source(str(tmp_path / "nowhere" / "model dir"))
    with pytest.raises(UserInputError, match="no model_index.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(UserInputError, match="only .safetensors"):
        resolve_source(str(tmp_path / "weights.ckpt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="hub is off"):
        resolve_source("someone/some-model")


def test_a_broken_folder_gives_one_clear_message(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(UserInputError, match="could not load folder model"):
        ModelManager("cpu").load(str(tmp_path))


def test_a_single_file_that_is_not_a_full_checkpoint_gives_one_clear_message(random_sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "partial.safetensors")
    for config in (None, str(random_sd_folder)):
        with pytest.raises(UserInputError, match="could not load single file model .* Fix: pass --config"):
            ModelManager("cpu").load(str(tmp_path / "partial.safetensors"), config)


def test_cli_generate_writes_a_png_with_metadata(manager, random_sd_folder, tmp_path):
    out = tmp_path / "out.png"
    sc_file = randomised_tuner_file(SCTuner(manager.editor.layout, 0.5), tmp_path / "style.safetensors")
    command = [sys.executable, "-m", "scedit_ui", "generate", "--prompt", "a red circle", "--seed", "3",
               "--steps", "2", "--model", str(random_sd_folder), "--out", str(out), "--rho-inner", "0.9"]
    subprocess.run([*command, "--tuner", f"{sc_file}:0.5", "--conditional-only"], check=True, capture_output=True)
    stored, _, _ = request_from_png(Image.open(out))
    assert stored.seed == 3 and stored.skip_tuning.rho_inner == 0.9
    assert stored.sc_tuners == (TunerUse(sc_file, 0.5, conditional_only=True),)

    bad = subprocess.run([*command, "--scheduler", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: unknown scheduler 'nope'; choose one of: {', '.join(SCHEDULERS)}"]


def test_cli_takes_what_the_tuner_file_asks_for_unless_told_otherwise(manager, random_sd_folder, tmp_path):
    sc_file = randomised_tuner_file(SCTuner(manager.editor.layout, 0.5), tmp_path / "style.safetensors",
                                    default_scale=0.5, default_conditional_only=True)
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "scedit_ui", "generate", "--prompt", "a red circle", "--steps", "1",
               "--model", str(random_sd_folder), "--out", str(out)]
    for options, expected in (
        (["--tuner", sc_file], TunerUse(sc_file, 0.5, conditional_only=True)),
        (["--tuner", f"{sc_file}:1.25", "--both-halves"], TunerUse(sc_file, 1.25, conditional_only=False)),
        (["--tuner", sc_file, "--texture-guidance"], TunerUse(sc_file, 0.5, texture=True)),
    ):
        subprocess.run([*command, *options], check=True, capture_output=True)
        assert request_from_png(Image.open(out))[0].sc_tuners == (expected,)

    (tmp_path / "broken.safetensors").write_bytes(b"not a tuner")
    bad = subprocess.run([*command, "--tuner", str(tmp_path / "broken.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: broken.safetensors is not a readable safetensors file") and bad.stderr.count("\n") == 1


def test_out_of_memory_is_reported_and_the_manager_keeps_serving(manager, monkeypatch):
    def run_out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    with monkeypatch.context() as patch:
        patch.setattr(manager, "_run_pipeline", run_out_of_memory)
        with pytest.raises(UserInputError, match="lower the image size or the batch size"):
            manager.generate(GenerationRequest("a star", **FAST))
    assert emptied and not manager.lock.locked()
    assert manager.generate(GenerationRequest("a star", **FAST)).images
