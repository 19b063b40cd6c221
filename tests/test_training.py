"""Tuner training on a random-weight SD folder (64 px, CPU): a few steps at batch 2 per run."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scedit_ui.cli import main
from scedit_ui.request import GenerationRequest
from scedit_ui.shapes.world import caption, render_scene, sample_scene
from scedit_ui.training import (
    TrainingConfig,
    calibration,
    TunerTrainer,
    load_training_data,
    prepare_caption,
    train_tuner,
    trainer,
)
from tuners import load_tuner
from tuners.sc_tuner import POSITION_CHANNELS
from tuners.validation import UserInputError


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three Shapes-world pictures with sidecar captions."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        scene = sample_scene(i, style="stripes")
        render_scene(scene, 80).save(folder / f"scene-{i}.png")
        (folder / f"scene-{i}.txt").write_text(caption(scene))
    return folder


def config_for(tmp_path: Path, model: Path, **overrides) -> TrainingConfig:
    settings = dict(
        kind="sc", data="shapes:stripes", out=tmp_path / "tuner.safetensors", steps=3, batch_size=2,
        checkpoint_every=2, preview_every=0, base_model=str(model), work_dir=tmp_path / "work", calibrate=False,
    )
    return TrainingConfig(**{**settings, **overrides})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    tuner, _ = load_tuner(path)
    return tuner.state_dict()


def never_called(event) -> None:
    raise AssertionError(f"a training step ran: {event}")


# --- data ---------------------------------------------------------------------------------------------------------


def test_captions_get_the_trigger_and_lose_the_removed_style_words():
    text = "a red circle at the top left on a blue background, in stripes style"
    assert prepare_caption(text, "<sce>", ["in stripes style"]) == "<sce> a red circle at the top left on a blue background"
    assert prepare_caption("Stripes: a red star", None, ["stripes"]) == "a red star"


def test_folder_captions_come_from_sidecar_files_or_metadata_jsonl(image_folder, tmp_path):
    (image_folder / "scene-2.txt").unlink()
    (image_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "scene-2.png", "text": "a listed caption"}) + "\n")
    data = load_training_data(config_for(tmp_path, Path("unused"), data=str(image_folder), trigger="<sce>"))
    assert data.size == 3
    assert data.caption(2) == "<sce> a listed caption"
    assert data.caption(0).startswith("<sce> ") and data.caption(0).endswith("in stripes style")
    assert data.image(0, 64).size == (64, 64)  # Resize + CenterCrop to the training resolution


def test_a_folder_without_any_captions_trains_on_the_trigger_word_alone(image_folder, tmp_path):
    for sidecar in image_folder.glob("*.txt"):
        sidecar.unlink()
    data = load_training_data(config_for(tmp_path, Path("unused"), data=str(image_folder), trigger="<sce>"))
    assert [data.caption(i) for i in range(3)] == ["<sce>"] * 3


def test_clutter_draws_unnamed_strokes_over_shapes_scenes_for_condition_tuners(tmp_path):
    stream = load_training_data(config_for(tmp_path, Path("unused"), kind="csc", condition="canny", data="shapes+clutter"))
    scene = sample_scene(7, split="train")
    assert stream.size is None and stream.caption(7) == caption(scene)
    cluttered, plain = np.asarray(stream.image(7, 64)), np.asarray(render_scene(scene, 64))
    assert np.array_equal(cluttered, np.asarray(stream.image(7, 64)))  # a function of the key
    assert 0.01 < (cluttered != plain).any(axis=-1).mean() < 0.6


def test_shapes_sources_give_a_few_shot_set_for_sc_and_a_stream_for_csc(tmp_path):
    few_shot = load_training_data(config_for(tmp_path, Path("unused"), data="shapes:pixelate"))
    stream = load_training_data(config_for(tmp_path, Path("unused"), kind="csc", condition="canny", data="shapes"))
    assert few_shot.size == 30 and few_shot.caption(0).endswith("in pixelate style")
    assert stream.size is None and stream.image(12345, 64).size == (64, 64)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("empty", "has no images"),
        ("unreadable", "cannot train on scene-1.png"),
        ("missing caption", "have no caption: scene-1.png"),
        ("not a folder", "is not a folder"),
    ],
)
def test_bad_data_fails_with_a_clear_error_before_any_step(problem, message, image_folder, tmp_path, random_sd_folder):
    if problem == "empty":
        for path in image_folder.iterdir():
            path.unlink()
    elif problem == "unreadable":
        (image_folder / "scene-1.png").write_bytes(b"not a picture")
    elif problem == "missing caption":
        (image_folder / "scene-1.txt").unlink()
    data = str(image_folder / "scene-0.png") if problem == "not a folder" else str(image_folder)
    with pytest.raises(UserInputError, match=message):
        train_tuner(config_for(tmp_path, random_sd_folder, data=data), progress=never_called)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kind="csc"), "needs a condition type"),
        (dict(kind="csc", condition="outpaint"), "cannot train condition"),
        (dict(condition="canny"), "for CSC tuners"),
        (dict(resolution=100), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(data="shapes:watercolour"), "unknown Shapes-world style"),
        (dict(kind="csc", condition="canny", position_features=True), "position features are for SC tuners"),
        (dict(kind="csc", condition="canny", gated=True), "gated adapters are for SC tuners"),
    ],
)
def test_bad_settings_fail_before_any_step(overrides, message, tmp_path, random_sd_folder):
    with pytest.raises(UserInputError, match=message):
        train_tuner(config_for(tmp_path, random_sd_folder, **overrides), progress=never_called)


# --- training -----------------------------------------------------------------------------------------------------


def test_only_tuner_parameters_train_and_change(tmp_path, random_sd_folder):
    trainer = TunerTrainer(config_for(tmp_path, random_sd_folder, steps=2))
    base = {name: module.state_dict() for name, module in trainer.pipeline.components.items() if isinstance(module, torch.nn.Module)}
    base = {f"{name}.{key}": t.clone() for name, state in base.items() for key, t in state.items()}
    tuner_before = {k: t.clone() for k, t in trainer.tuner.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.tuner.parameters()}
    assert not any(p.requires_grad for p in trainer.pipeline.unet.parameters())

    trainer.run()

    after = {name: module.state_dict() for name, module in trainer.pipeline.components.items() if isinstance(module, torch.nn.Module)}
    after = {f"{name}.{key}": t for name, state in after.items() for key, t in state.items()}
    assert all(torch.equal(base[k], after[k]) for k in base)
    changed = [k for k, t in trainer.tuner.state_dict().items() if not torch.equal(t, tuner_before[k])]
    assert any(k.endswith("ln2.weight") for k in changed)  # the zero-initialised up-projections moved


def test_sc_output_loads_and_carries_its_metadata(image_folder, tmp_path, random_sd_folder):
    config = config_for(tmp_path, random_sd_folder, data=str(image_folder), trigger="<sce>", down_ratio=0.5, save_dtype="float16")
    result = train_tuner(config)
    tuner, metadata = load_tuner(result.output)
    assert result.output == config.out and not result.cancelled and result.steps == 3
    assert metadata.kind == "sc" and metadata.down_ratio == 0.5 and metadata.trigger_word == "<sce>"
    assert metadata.training["steps"] == 3 and metadata.training["dataset_size"] == 3
    assert metadata.training["base_model"] == str(random_sd_folder) and metadata.training["training_seconds"] >= 0
    assert (metadata.default_scale, metadata.default_conditional_only) == (1.0, False)  # not calibrated: the paper's way
    assert tuner.adapters[0].ln1.weight.shape[:2] == (4, 8 + POSITION_CHANNELS)  # int(8 · 0.5) from 8 channels and the position
    assert all(t.dtype == torch.float16 for t in load_file(str(result.output)).values())


def test_csc_output_names_its_condition_type(tmp_path, random_sd_folder):
    result = train_tuner(config_for(tmp_path, random_sd_folder, kind="csc", condition="canny", data="shapes", steps=2))
    _, metadata = load_tuner(result.output)
    assert metadata.kind == "csc" and metadata.condition_type == "canny" and metadata.kernel_size == 1
    assert metadata.training["dataset"] == "Shapes world, endless stream"


def test_init_starts_from_a_tuner_files_weights_and_records_its_training(tmp_path, random_sd_folder):
    first = train_tuner(config_for(tmp_path, random_sd_folder, kind="csc", condition="canny", data="shapes", steps=2))
    continued = TunerTrainer(config_for(
        tmp_path, random_sd_folder, kind="csc", condition="canny", data="shapes", steps=1, seed=1,
        init_from=first.output, out=tmp_path / "continued.safetensors", work_dir=tmp_path / "work-2",
    ))
    assert all(torch.equal(t, tensors(first.output)[k]) for k, t in continued.tuner.state_dict().items())
    _, metadata = load_tuner(continued.run().output)
    assert metadata.training["steps"] == 1
    assert metadata.training["init"]["file"] == "tuner.safetensors" and metadata.training["init"]["steps"] == 2


@pytest.mark.parametrize(
    "init, message",
    [("missing.safetensors", "no tuner file at"), ("sc-tuner", "but this run trains"), ("not-a-tuner", "--init: ")],
)
def test_init_refuses_a_missing_or_different_tuner_before_any_step(init, message, tmp_path, random_sd_folder):
    if init == "sc-tuner":
        init = train_tuner(config_for(tmp_path, random_sd_folder, steps=1)).output
    elif init == "not-a-tuner":
        init = tmp_path / "garbage.safetensors"
        init.write_bytes(b"not safetensors")
    config = config_for(tmp_path, random_sd_folder, kind="csc", condition="canny", data="shapes", init_from=tmp_path / init,
                        out=tmp_path / "continued.safetensors", work_dir=tmp_path / "work-2")
    with pytest.raises(UserInputError, match=message):
        train_tuner(config, progress=never_called)


def test_texture_distance_and_colour_drift_tell_a_style_from_its_absence():
    plain = [render_scene(sample_scene(i), 128) for i in range(4)]
    striped = [render_scene(sample_scene(i, style="stripes"), 128) for i in range(4, 8)]
    reference = np.mean([calibration.texture_spectrum(p) for p in striped], axis=0)
    new_striped = calibration.texture_spectrum(render_scene(sample_scene(9, style="stripes"), 128))
    new_plain = calibration.texture_spectrum(render_scene(sample_scene(9), 128))
    assert calibration.texture_distance(new_striped, reference) < calibration.texture_distance(new_plain, reference) - 0.2
    assert calibration.colour_drift(plain[0], plain[0]) == 0.0
    assert calibration.colour_drift(Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")) == 1.0


def test_previews_and_calibration_sample_step_by_step_as_the_app_does_and_training_has_no_step(tmp_path, random_sd_folder):
    trainer = TunerTrainer(config_for(tmp_path, random_sd_folder, preview_steps=3))
    steps = []
    set_step = trainer.editor.set_step

    def record(index, total=0):
        steps.append(None if index is None else (index, total))
        set_step(index, total)

    trainer.editor.set_step = record
    with trainer._sampling() as sample:
        sample(["a red circle"], [0], 3)
        assert steps == [(0, 3), (1, 3), (2, 3)]  # step ranges apply as in generation
    assert steps[-1] is None and trainer.editor.step is None


def test_sampling_in_batches_gives_each_prompt_and_seed_the_image_it_gets_alone(tmp_path, random_sd_folder, monkeypatch):
    monkeypatch.setattr(trainer, "SAMPLING_BATCH", 2)  # three images: a full batch and a part one
    training = TunerTrainer(config_for(tmp_path, random_sd_folder, preview_steps=2))
    with torch.no_grad():
        for p in training.tuner.parameters():
            p.normal_(0, 0.2)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [0, 1, 2]
    with training._sampling() as sample:
        training.editor.add_sc_tuner("training", training.tuner, 1.5, texture=True)  # the batch grows by the prompt's rows
        together = [np.asarray(image, np.float32) for image in sample(prompts, seeds, 2)]
        alone = [np.asarray(sample([prompt], [seed], 2)[0], np.float32) for prompt, seed in zip(prompts, seeds)]
    assert len(together) == 3
    assert np.abs(together[0] - together[2]).mean() > 1.0  # different seeds: different images
    for batched, single in zip(together, alone):
        assert np.abs(batched - single).max() <= 2.0  # the same image, up to float rounding of a larger batch


def test_the_calibration_samples_with_a_generations_default_steps_not_the_preview_steps(tmp_path, random_sd_folder, monkeypatch):
    training = TunerTrainer(config_for(tmp_path, random_sd_folder, preview_steps=2))  # the Train tab's previews are short too
    totals = []
    set_step = training.editor.set_step

    def record(index, total=0):
        if index is not None:
            totals.append(total)
        set_step(index, total)

    def one_candidate(pictures, base, generate, colour_accuracy=None):
        generate(1.0, False, True)
        return [calibration.CandidateScore(1.0, False, 0.5, 0.0, texture=True)]

    training.editor.set_step = record
    monkeypatch.setattr(trainer, "score_candidates", one_candidate)
    training.calibrate_default()
    assert totals and set(totals) == {GenerationRequest.steps}  # the base's images and the candidate's


def test_calibration_images_apply_a_conditional_only_tuner_to_the_prompts_half_only(tmp_path, random_sd_folder):
    trainer = TunerTrainer(config_for(tmp_path, random_sd_folder, preview_steps=2))
    with torch.no_grad():
        for p in trainer.tuner.parameters():
            p.normal_(0, 0.2)
    pictures = {}
    with trainer._sampling() as sample:
        for conditional_only in (False, True):
            trainer.editor.add_sc_tuner("training", trainer.tuner, 1.0, conditional_only)
            pictures[conditional_only] = np.asarray(sample(["a red circle"], [0], 2)[0], np.float32)
    assert np.abs(pictures[True] - pictures[False]).mean() > 1.0  # the unconditional half kept the base's prediction
    assert not trainer.editor.guidance_halves  # training batches have no halves


def test_the_default_is_the_first_candidate_that_keeps_the_colours_within_the_limit():
    limit = calibration.MAX_COLOUR_DRIFT
    scores = [calibration.CandidateScore(2.0, False, 0.90, limit + 0.01, texture=True),
              calibration.CandidateScore(1.5, False, 0.20, limit, texture=True), calibration.CandidateScore(1.0, False, 0.50, limit / 2)]
    assert calibration.choose_default(scores) == scores[1]  # preferred over a larger gain further down the list
    assert calibration.choose_default(scores[:1] + scores[2:]) == scores[2]
    over = [calibration.CandidateScore(s.scale, s.conditional_only, s.texture_gain, limit + d, s.texture) for s, d in zip(scores, (0.3, 0.1, 0.2))]
    assert calibration.choose_default(over) == over[1]  # nothing keeps the colours: the one that moves them least
    assert calibration.CANDIDATES[-1] == (1.0, False, False)
    # where the checker reads the prompts (the built-in model), the colour accuracy lost decides, not the drift proxy
    lost = calibration.MAX_COLOUR_LOSS
    checked = [calibration.CandidateScore(2.0, False, 0.9, 0.0, True, colour_loss=lost + 0.05),
               calibration.CandidateScore(1.5, False, 0.5, 1.0, True, colour_loss=lost)]
    assert calibration.choose_default(checked) == checked[1]


@pytest.mark.parametrize("strongest_kept", [2.0, 1.875, 1.625, 1.5, 1.25, 1.125, 1.0, None])
def test_the_calibration_bisects_the_texture_strengths_to_the_first_that_keeps_the_colours(strongest_kept):
    base = [Image.new("RGB", (32, 32), (200, 40, 40))]
    tried = []

    def generate(scale: float, conditional_only: bool, texture: bool) -> list[Image.Image]:
        tried.append((scale, conditional_only, texture))
        moved = strongest_kept is None or scale > strongest_kept or (not texture and strongest_kept != 1.0)
        shift = 120 if moved else 0  # a stronger candidate moves every colour far
        return [Image.new("RGB", (32, 32), (200 - shift, 40 + shift, 40))]

    scores = calibration.score_candidates(base, base, generate)
    assert len(set(tried)) == len(tried) == len(scores) <= 5  # bisection: 4 of the 9 strengths at most, then the plain scale
    chosen = calibration.choose_default(scores)
    if strongest_kept is None:  # nothing keeps the colours: the plain scale was tried last
        assert not any(s.keeps_colours() for s in scores) and not scores[-1].texture
        return
    assert chosen.keeps_colours() and chosen.scale == strongest_kept

    def rank(score: calibration.CandidateScore) -> int:
        return calibration.CANDIDATES.index((score.scale, score.conditional_only, score.texture))

    assert all(not s.keeps_colours() for s in scores if rank(s) < rank(chosen))  # every preferred one measured moves them


def test_above_the_preservation_threshold_the_target_is_the_base_models_own_prediction(tmp_path, random_sd_folder):
    # A fresh SC tuner is the identity, so where the target is the base's prediction the first loss is exactly 0.
    losses = {}
    for threshold in (0.0, 1.0):
        events = []
        train_tuner(config_for(tmp_path / str(threshold), random_sd_folder, steps=1, preserve_base_above=threshold), events.append)
        losses[threshold] = events[0].loss
    assert losses[0.0] == 0.0 and losses[1.0] > 0.01


def test_an_uncaptioned_folder_trains_and_previews_its_trigger_word_once(image_folder, tmp_path, random_sd_folder):
    for sidecar in image_folder.glob("*.txt"):
        sidecar.unlink()
    events = []
    config = config_for(tmp_path, random_sd_folder, data=str(image_folder), trigger="<sce>", steps=1, preview_every=1, preview_steps=2)
    result = train_tuner(config, events.append)
    assert len(events[0].previews) == 1 and load_tuner(result.output)[1].training["dataset_size"] == 3


def test_a_stream_outgrowing_the_prompt_cache_keeps_training(tmp_path, random_sd_folder, monkeypatch):
    # Found training a canny tuner: the cache was emptied after this batch's cached prompts (often "") were looked up.
    monkeypatch.setattr(trainer, "TEXT_CACHE_SIZE", 2)
    config = config_for(tmp_path, random_sd_folder, kind="csc", condition="canny", data="shapes", steps=4, batch_size=3, caption_dropout=0.5)
    assert train_tuner(config).output.is_file()


def test_cancel_stops_within_one_step_and_keeps_the_checkpoint(tmp_path, random_sd_folder):
    cancel = threading.Event()
    seen = []

    def progress(event):
        seen.append(event.step)
        if event.step == 1:
            cancel.set()

    result = train_tuner(config_for(tmp_path, random_sd_folder, steps=5, checkpoint_every=10), progress, cancel)
    assert result.cancelled and result.steps == 1 and seen == [1]
    assert result.output is None and not (tmp_path / "tuner.safetensors").exists()
    assert torch.load(result.checkpoint, weights_only=True)["step"] == 1


def test_an_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, random_sd_folder):
    kind = dict(kind="csc", condition="canny", data="shapes", steps=4)
    whole = train_tuner(config_for(tmp_path / "whole", random_sd_folder, **kind))

    cancel = threading.Event()
    interrupted = config_for(tmp_path / "parts", random_sd_folder, **kind)
    first = train_tuner(interrupted, lambda e: e.step == 2 and cancel.set(), cancel)
    assert first.cancelled and first.steps == 2
    with pytest.raises(UserInputError, match="add --resume"):
        train_tuner(interrupted)
    steps = []
    resumed = train_tuner(replace(interrupted, resume=True), lambda e: steps.append(e.step))
    assert steps == [3, 4] and resumed.steps == 4
    expected, actual = tensors(whole.output), tensors(resumed.output)
    assert all(torch.allclose(expected[k], actual[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize(
    "change, field", [(dict(batch_size=1), "batch_size"), (dict(position_features=False), "position_features"), (dict(gated=False), "gated")],
)
def test_resume_refuses_a_checkpoint_of_different_settings(tmp_path, random_sd_folder, change, field):
    train_tuner(config_for(tmp_path, random_sd_folder, steps=2))
    with pytest.raises(UserInputError, match=f"differs in {field}"):
        train_tuner(config_for(tmp_path, random_sd_folder, steps=4, resume=True, **change), progress=never_called)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, random_sd_folder, monkeypatch):
    real_save = torch.save

    def crash_at_step_4(obj, path, *args, **kwargs):
        if obj["step"] == 4:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_at_step_4)
    config = config_for(tmp_path, random_sd_folder, steps=4, checkpoint_every=2)
    with pytest.raises(OSError, match="disk full"):
        train_tuner(config)
    monkeypatch.setattr(torch, "save", real_save)
    work = tmp_path / "work"
    assert [p.name for p in work.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not config.out.exists()
    steps = []
    train_tuner(replace(config, resume=True), lambda e: steps.append(e.step))
    assert steps == [3, 4] and config.out.exists()


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, random_sd_folder):
    plain = train_tuner(config_for(tmp_path / "plain", random_sd_folder, steps=2))
    checkpointed = train_tuner(config_for(tmp_path / "ckpt", random_sd_folder, steps=2, gradient_checkpointing=True))
    expected, actual = tensors(plain.output), tensors(checkpointed.output)
    assert all(torch.allclose(expected[k], actual[k], atol=1e-6) for k in expected)


def test_previews_come_from_fixed_prompts_every_n_steps(tmp_path, random_sd_folder):
    events = []
    config = config_for(
        tmp_path, random_sd_folder, kind="csc", condition="color", data="shapes", steps=2, preview_every=1, preview_steps=2,
        preview_prompts=("a red circle in the center on a blue background",), preview_seeds=(0, 1),
    )
    result = train_tuner(config, events.append)
    assert [len(e.previews) for e in events] == [2, 2]
    assert all(image.size == (64, 64) for e in events for image in e.previews)
    assert len(result.previews) == 4 and all(path.is_file() for path in result.previews)
    assert [path for e in events for path in e.preview_paths] == result.previews
    assert 0 < events[0].elapsed_seconds <= events[1].elapsed_seconds


# --- command line -------------------------------------------------------------------------------------------------


def test_cli_prints_step_loss_time_left_and_previews_then_the_output_path(tmp_path, random_sd_folder, capsys):
    out = tmp_path / "style.safetensors"
    code = main(["train", "--kind", "sc", "--data", "shapes:pixelate", "--steps", "2", "--batch", "1", "--out", str(out),
                 "--trigger", "<sce>", "--model", str(random_sd_folder), "--work-dir", str(tmp_path / "work"),
                 "--preview-every", "1", "--preview-prompt", "<sce> a red star"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == str(out)
    lines = captured.err.splitlines()
    assert lines[0].startswith("training Shapes world (pixelate), 30 scenes: 2 steps") and str(tmp_path / "work") in lines[0]
    assert re.fullmatch(r"step 1/2 loss \d+\.\d{4} eta \d+:\d\d elapsed \d+:\d\d", lines[1])
    previews = [Path(p) for line in lines if line.startswith("  previews: ") for p in line.split()[1:]]
    assert [p.name for p in previews] == ["step-000001-0.png", "step-000002-0.png"] and all(p.is_file() for p in previews)
    metadata = load_tuner(out)[1]
    assert metadata.trigger_word == "<sce>"
    assert metadata.kernel_size == 3  # an SC tuner's default adapter sees its neighbours (textures)
    assert metadata.position_features is True  # ... and where it is on the canvas
    assert metadata.gated is True  # ... and its adapters are gated
    # after training, the default use is measured (calibration) and printed
    assert lines[-1] == calibration.describe_default(metadata) and lines[-1].startswith("default use, measured on new prompts: scale ")
    measured = [calibration.CandidateScore(**c) for c in metadata.training["default_use_measured"]["candidates"]]
    assert all(c.colour_loss is None for c in measured)  # a random SD folder, not the built-in model: the drift proxy
    chosen = calibration.choose_default(measured)
    ways = [(c.scale, c.conditional_only, c.texture) for c in measured]
    assert ways == [c for c in calibration.CANDIDATES if c in ways] and len(ways) <= 5  # in order; bisected, not all
    assert (chosen.scale, chosen.conditional_only, chosen.texture) == (metadata.default_scale, metadata.default_conditional_only, metadata.default_texture)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--kind", "sc", "--data", "EMPTY"], "has no images"),
        (["--kind", "csc", "--data", "shapes"], "needs a condition type"),
        (["--kind", "csc", "--condition", "canny", "-p", "low=-5", "--data", "shapes"], "low must be a whole number from 0 to 1000"),
    ],
)
def test_cli_bad_input_exits_with_code_2_and_one_line(arguments, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    arguments = [str(tmp_path / "empty") if a == "EMPTY" else a for a in arguments]
    code = main(["train", *arguments, "--steps", "5", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
