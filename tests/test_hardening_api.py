"""Bad input through the Python API and the command lines: one clear error, no traceback, nothing written elsewhere.

Random-weight SD folder (64 px, CPU); see docs/hardening.md for the table of what was tried and fixed.
"""
from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import (
    BROKEN_IMAGES,
    HOSTILE_NAMES,
    code_running_pickle,
    damaged_tuner_files,
    save_picture,
    unusual_images,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import app
from scedit_ui import cli, conditions
from scedit_ui.model_manager import image_to_tensor, resolve_source
from scedit_ui.request import (
    ConditionUse,
    GenerationRequest,
    SkipTuningSettings,
    TunerUse,
    read_png_request,
    save_png,
)
from scedit_ui.training import TrainingConfig, train_tuner
from scedit_ui.tuner_library import TunerLibrary
from tuners import SCTuner, TunerMetadata, save_tuner
from tuners.validation import UserInputError

FAST = dict(steps=2, guidance=5.0)


@pytest.fixture(scope="module")
def tuner_files(manager, tmp_path_factory) -> tuple[dict[str, tuple[Path, str]], Path]:
    folder = tmp_path_factory.mktemp("tuner-files")
    marker = folder / "code-ran"
    return damaged_tuner_files(manager.editor.layout, folder / "files", marker), marker


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def files_under(folder: Path, but: Path | None = None) -> set[Path]:
    """Everything below `folder`, except `but` and what lies in it."""
    return {p.relative_to(folder) for p in folder.rglob("*") if but is None or not (p == but or but in p.parents)}


# -- pictures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BROKEN_IMAGES))
def test_a_broken_picture_is_refused_naming_the_file(kind, tmp_path):
    data, message = BROKEN_IMAGES[kind]
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    with pytest.raises(UserInputError, match=message) as refused:
        conditions.load_image(path, name="upload.png")
    assert "upload.png" in str(refused.value) and str(tmp_path) not in str(refused.value)


@pytest.mark.parametrize("kind", list(unusual_images()))
def test_unusual_pictures_are_read_as_the_rgb_a_user_sees(kind, tmp_path):
    image, suffix, expected = unusual_images()[kind]
    loaded = conditions.load_image(save_picture(image, tmp_path / f"picture{suffix}"))
    assert loaded.mode == "RGB" and loaded.size == image.size
    assert np.abs(pixels(loaded).astype(int) - expected).max() <= 3
    colour_map = conditions.extract_condition(loaded, "color", (64, 64), ratio=8)
    assert colour_map.size == (64, 64) and np.abs(pixels(colour_map)[32, 32].astype(int) - expected).max() <= 3


def test_a_16_bit_condition_image_given_to_the_api_keeps_its_grey():
    grey = image_to_tensor(Image.new("I;16", (8, 8), 40_000), (8, 8))
    assert grey.shape == (1, 3, 8, 8) and torch.allclose(grey, torch.full_like(grey, 156 / 255))


def test_an_over_long_path_is_one_clear_error():
    with pytest.raises(UserInputError, match="cannot be opened") as refused:
        conditions.load_image("x" * 5000)
    assert len(str(refused.value)) < 300


# -- generation requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": None}, "the prompt must be text"),
        ({"prompt": ["a", "list"]}, "the prompt must be text"),
        ({"negative_prompt": 7}, "the negative prompt must be text"),
        ({"prompt": "a red circle " * 1000}, "characters long; the limit is 10,000"),
        ({"width": "abc"}, "width must be a whole number"),
        ({"width": float("nan")}, "width must be a whole number"),
        ({"height": float("inf")}, "height must be a whole number"),
        ({"seed": 2**40}, "seed must be a whole number from"),
        ({"seed": -3}, "seed must be a whole number from"),
        ({"steps": -1}, "steps must be a whole number from"),
        ({"guidance": float("inf")}, "guidance must be a number from 0 to 30"),
        ({"batch_size": 10**9}, "batch size must be a whole number from"),
        ({"scheduler": "../../PLMS"}, "unknown scheduler"),
        ({"skip_tuning": SkipTuningSettings(overrides=((99, 0.5),))}, "skip index must be a whole number from 0 to 11"),
        ({"skip_tuning": SkipTuningSettings(rho_inner=float("nan"))}, "ρ inner must be a number from 0 to 4"),
        ({"skip_tuning": SkipTuningSettings(step_range=(0.0, 0.5, 1.0))}, "must be two numbers"),
        ({"sc_tuners": (TunerUse(["not", "a", "path"]),)}, "must be given as a file path"),
        ({"sc_tuners": (TunerUse("x.safetensors", float("nan")),)}, "scale of x.safetensors must be a number from -4 to 4"),
        ({"conditions": (ConditionUse("x.safetensors", "not an image"),)}, "must be PIL images"),
        ({"freeu": (1.0, 1.0)}, "FreeU needs four factors"),
    ],
)
def test_a_bad_request_is_refused_before_any_work(manager, monkeypatch, change, message):
    monkeypatch.setattr(manager, "_run_pipeline", lambda *a: pytest.fail("the pipeline ran"))
    with pytest.raises(UserInputError, match=message):
        manager.generate(replace(GenerationRequest("a square", **FAST), **change))
    assert not manager.lock.locked()


def test_an_empty_prompt_is_a_valid_unconditional_request(manager):
    image = manager.generate(GenerationRequest("", **FAST)).images[0]
    assert image.size == (64, 64) and pixels(image).std() > 0


def test_every_file_posing_as_a_tuner_is_refused_and_no_pickle_runs(manager, tuner_files):
    files, marker = tuner_files
    for name, (path, message) in files.items():
        with pytest.raises(UserInputError, match=message):
            manager.generate(GenerationRequest("a square", sc_tuners=(TunerUse(str(path)),), **FAST))
        assert not manager.lock.locked(), name
    assert not marker.exists()
    assert manager.generate(GenerationRequest("a square", **FAST)).images


def test_out_of_memory_in_the_unet_frees_the_cache_and_the_edits(manager, monkeypatch, tmp_path):
    layout = manager.editor.layout
    style = SCTuner(layout, 0.5)
    with torch.no_grad():
        for parameter in style.parameters():
            parameter.normal_(0, 0.3)
    save_tuner(style, tmp_path / "style.safetensors", TunerMetadata.describe(style, "test"))
    plain = GenerationRequest("a blue square", seed=4, **FAST)
    baseline = pixels(manager.generate(plain).images[0])

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    unet = manager.pipeline.unet

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(unet, "forward", out_of_memory)
        with pytest.raises(UserInputError, match="out of GPU memory: lower the image size or the batch size"):
            manager.generate(replace(plain, sc_tuners=(TunerUse(str(tmp_path / "style.safetensors")),), batch_size=8))
    assert emptied and not manager.lock.locked()
    assert np.array_equal(pixels(manager.generate(plain).images[0]), baseline)  # the SC tuner did not stay attached


@pytest.mark.parametrize("name, message", [("x" * 5000, "cannot be looked up as a local path"), ("../", "not a diffusers pipeline"),
                                           ("/etc/passwd", "only .safetensors"), ("nul\x00byte", "not found")])
def test_odd_model_names_are_explained(name, message):
    with pytest.raises(UserInputError, match=message) as refused:
        resolve_source(name)
    assert len(str(refused.value)) < 300


# -- PNG settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "metadata of this image is damaged .JSONDecodeError"),
        (json.dumps([1, 2]), "metadata of this image is damaged .TypeError"),
        (json.dumps({"request": {"prompt": "a"}, "index": 0}), "metadata of this image is damaged .KeyError"),
        (json.dumps({"request": {"prompt": "a", "steps": -5, "width": 64, "height": 64}, "index": 0, "model": "m"}), "damaged: steps must be"),
        (json.dumps({"request": {"prompt": "a", "width": 64, "height": 64}, "index": 3, "model": "m"}), "damaged: image index must be"),
    ],
)
def test_damaged_png_settings_are_one_clear_error(text, message, tmp_path):
    info = PngInfo()
    info.add_text("scedit", text)
    Image.new("RGB", (8, 8)).save(tmp_path / "edited.png", pnginfo=info)
    with pytest.raises(UserInputError, match=message):
        read_png_request(tmp_path / "edited.png")


def test_png_settings_of_a_bomb_or_a_non_image_are_refused(tmp_path):
    (tmp_path / "bomb.png").write_bytes(BROKEN_IMAGES["decompression bomb"][0])
    (tmp_path / "text.png").write_bytes(BROKEN_IMAGES["not an image"][0])
    with pytest.raises(UserInputError, match="bomb.png is too large to open safely"):
        read_png_request(tmp_path / "bomb.png")
    with pytest.raises(UserInputError, match="text.png is not a PNG that can be read"):
        read_png_request(tmp_path / "text.png")


def test_png_settings_of_a_generated_image_round_trip(manager, tmp_path):
    image = manager.generate(GenerationRequest("a ring", seed=8, batch_size=2, **FAST)).images[1]
    save_png(image, str(tmp_path / "made.png"))
    request, index, _ = read_png_request(tmp_path / "made.png")
    assert (request.seed, index) == (8, 1)


# -- the tuner library ---------------------------------------------------------------------------------


@pytest.fixture
def library(tmp_path) -> TunerLibrary:
    return TunerLibrary(tmp_path / "root" / "library", shipped=tmp_path / "shipped")


def test_hostile_names_never_leave_the_library_folder(library, manager, tmp_path):
    style = SCTuner(manager.editor.layout, 0.5)
    metadata = TunerMetadata.describe(style, "test")
    outside_before = files_under(tmp_path, but=library.root)
    saved = []
    for name in HOSTILE_NAMES:
        try:
            saved.append(library.save(style, metadata, name))
        except UserInputError as refused:
            assert "is not a usable tuner name" in str(refused)
        with pytest.raises(UserInputError, match="no tuner named"):
            library.find(name)
    assert saved and all(path.parent == library.root for path in saved)
    assert all(len(path.name) <= 100 for path in saved)
    first = saved[0].stem
    for name in HOSTILE_NAMES:
        try:
            first = library.rename(first, name).stem
        except UserInputError as refused:
            assert "is not a usable tuner name" in str(refused) or "already exists" in str(refused)
    assert files_under(tmp_path, but=library.root) == outside_before | {Path("root")}


def test_a_damaged_file_in_the_library_is_listed_with_its_reason(library, tuner_files):
    files, _ = tuner_files
    library.root.mkdir(parents=True)
    for path, _ in files.values():
        (library.root / path.name).write_bytes(path.read_bytes())
    entries = {entry.name: entry for entry in library.entries()}
    assert set(entries) == set(files)
    assert "metadata is a JSON list" in entries["metadata-a-list"].error
    assert "skip_channels must be a list" in entries["metadata-wrong-types"].error
    assert entries["other-layout"].metadata is not None and entries["other-layout"].error is None


def test_import_refuses_each_damaged_file_and_adds_nothing(library, manager, tuner_files):
    files, marker = tuner_files
    library.root.mkdir(parents=True)
    for name, (path, message) in files.items():
        if name == "other-layout":  # a sound tuner for another base is kept, and listed as not fitting
            continue
        with pytest.raises(UserInputError, match=message):
            library.import_file(path, layout=manager.editor.layout)
    assert not list(library.root.iterdir()) and not marker.exists()


def test_import_refuses_a_code_running_pickle_without_unpickling_it(library, manager, tmp_path):
    marker = tmp_path / "code-ran"
    for name in ("pytorch_model.bin", "checkpoint.pt"):
        (tmp_path / name).write_bytes(code_running_pickle(marker))
        with pytest.raises(UserInputError, match="not a weights-only PyTorch checkpoint .*it was not unpickled"):
            library.import_file(tmp_path / name, layout=manager.editor.layout)
    assert not marker.exists() and not library.root.exists()


def test_import_refuses_an_official_checkpoint_with_a_damaged_configuration(library, manager, tmp_path):
    torch.save({"lsc_identity.0.ln1.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "configuration.json").write_text("{not json")
    with pytest.raises(UserInputError, match="configuration.json beside pytorch_model.bin is not readable JSON"):
        library.import_file(tmp_path / "pytorch_model.bin", layout=manager.editor.layout)


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"learning_rate": float("nan")}, "learning rate must be a number"),
        ({"steps": -4}, "steps must be a whole number"),
        ({"batch_size": 2.5}, "batch size must be a whole number"),
        ({"resolution": 10**9}, "resolution must be a whole number"),
        ({"kind": "../sc"}, "kind must be 'sc'"),
        ({"kind": "csc", "condition": "nope"}, "cannot train condition"),
        ({"out": Path("tuner.bin")}, "must be a .safetensors file"),
    ],
)
def test_bad_training_settings_are_refused_before_loading_anything(change, message, tmp_path):
    config = TrainingConfig(kind="sc", data="shapes", out=tmp_path / "t.safetensors", steps=1, work_dir=tmp_path / "work")
    with pytest.raises(UserInputError, match=message):
        train_tuner(replace(config, **change))
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("content", ["garbage", "empty", "code-running pickle"])
def test_resuming_from_a_damaged_checkpoint_is_refused_without_unpickling(content, tmp_path, random_sd_folder):
    marker = tmp_path / "code-ran"
    work = tmp_path / "work"
    work.mkdir()
    data = {"garbage": b"\x00garbage" * 10, "empty": b"", "code-running pickle": code_running_pickle(marker)}[content]
    (work / "checkpoint.pt").write_bytes(data)
    config = TrainingConfig(kind="sc", data="shapes", out=tmp_path / "t.safetensors", steps=1, batch_size=1,
                            base_model=str(random_sd_folder), work_dir=work, resume=True)
    with pytest.raises(UserInputError, match="cannot resume from .*checkpoint.pt: it is not a checkpoint of this program"):
        train_tuner(config)
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()


# -- command lines ---------------------------------------------------------------------------------------


def run_cli(capsys, *arguments: str) -> tuple[int, list[str]]:
    code = cli.main(list(arguments))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--size", "0x0"], "size 0x0 is out of range"),
        (["--size", "1x1"], "width must be a whole number from 64 to 2048"),
        (["--guidance", "nan"], "guidance must be a number from 0 to 30"),
        (["--steps", "-5"], "steps must be a whole number from"),
        (["--seed", "99999999999999"], "seed must be a whole number from"),
        (["--scheduler", "../DDIM"], "unknown scheduler"),
        (["--rho-inner", "inf"], "ρ inner must be a number from 0 to 4"),
        (["--prompt", "long " * 3000], "characters long"),
        (["--tuner", "../../no-such-tuner"], "not found"),
        (["--model", "x" * 5000], "cannot be looked up as a local path"),
    ],
)
def test_cli_generate_refuses_bad_values_in_one_line(arguments, message, capsys, random_sd_folder, tmp_path):
    base = ["generate", "--prompt", "a red circle", "--steps", "2", "--model", str(random_sd_folder), "--out", str(tmp_path / "o.png")]
    code, lines = run_cli(capsys, *base, *arguments)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_cli_generate_refuses_files_posing_as_tuners_in_one_line(tuner_files, capsys, random_sd_folder, tmp_path):
    files, marker = tuner_files
    for name in ("pickle-renamed", "metadata-a-list", "wrong-shapes"):
        path, message = files[name]
        code, lines = run_cli(capsys, "generate", "--prompt", "a", "--steps", "2", "--model", str(random_sd_folder),
                              "--tuner", str(path), "--out", str(tmp_path / "o.png"))
        assert code == 2 and len(lines) == 1 and message in lines[0], name
    assert not marker.exists()


def test_cli_generate_to_an_unwritable_place_is_one_line(capsys, random_sd_folder, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    code, lines = run_cli(capsys, "generate", "--prompt", "a", "--steps", "2", "--model", str(random_sd_folder),
                          "--out", str(tmp_path / "a-file" / "o.png"))
    assert code == 2 and lines == [f"error: cannot use {tmp_path / 'a-file'}: File exists"]


@pytest.mark.parametrize("kind", list(BROKEN_IMAGES))
def test_cli_condition_refuses_a_broken_picture_in_one_line(kind, capsys, tmp_path):
    data, message = BROKEN_IMAGES[kind]
    (tmp_path / "in.png").write_bytes(data)
    code, lines = run_cli(capsys, "condition", "canny", "--in", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.png"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and any(m in lines[0] for m in message.split("|"))
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("kind", list(unusual_images()))
def test_cli_condition_reads_unusual_pictures(kind, capsys, tmp_path):
    image, suffix, expected = unusual_images()[kind]
    picture = save_picture(image, tmp_path / f"in{suffix}")
    code, _ = run_cli(capsys, "condition", "color", "--in", str(picture), "--out", str(tmp_path / "out.png"), "--size", "16x16")
    assert code == 0
    assert np.abs(pixels(Image.open(tmp_path / "out.png"))[8, 8].astype(int) - expected).max() <= 3


def test_cli_condition_refuses_an_unknown_kind_and_an_over_long_path(capsys, tmp_path):
    code, lines = run_cli(capsys, "condition", "../canny", "--in", "x.png", "--out", str(tmp_path / "o.png"))
    assert code == 2 and lines == [f"error: unknown condition kind '../canny'; choose one of {', '.join(conditions.CONDITION_KINDS)}"]
    code, lines = run_cli(capsys, "condition", "canny", "--in", "x" * 5000, "--out", str(tmp_path / "o.png"))
    assert code == 2 and len(lines) == 1 and "cannot be opened (File name too long)" in lines[0] and len(lines[0]) < 300


def test_cli_train_resume_from_a_damaged_checkpoint_is_one_line(capsys, random_sd_folder, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "checkpoint.pt").write_bytes(b"")
    code, lines = run_cli(capsys, "train", "--kind", "sc", "--data", "shapes", "--steps", "1", "--batch", "1", "--resume",
                          "--model", str(random_sd_folder), "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "t.safetensors"))
    assert code == 2 and len(lines) == 1 and "it is not a checkpoint of this program (EOFError)" in lines[0]


def test_app_refuses_a_library_that_is_a_file_and_a_port_out_of_range(capsys, random_sd_folder, tmp_path):
    (tmp_path / "library").write_text("a file")
    code = app.main(["--model", str(random_sd_folder), "--device", "cpu", "--library", str(tmp_path / "library"),
                     "--outputs", str(tmp_path / "outputs")])
    lines = capsys.readouterr().err.strip().splitlines()  # before it: the model's loading progress bars
    assert code == 2 and lines[-1] == f"error: cannot use {tmp_path / 'library'} as a folder: File exists"
    assert not any("Traceback" in line for line in lines)
    with pytest.raises(SystemExit) as usage:
        app.build_parser().parse_args(["--port", "99999"])
    assert usage.value.code == 2 and "invalid port_number value: '99999'" in capsys.readouterr().err


def test_app_on_a_busy_port_is_one_line(capsys, random_sd_folder, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = app.main(["--model", str(random_sd_folder), "--device", "cpu", "--library", str(tmp_path / "library"),
                         "--outputs", str(tmp_path / "outputs"), "--port", str(port)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: cannot serve on 127.0.0.1:{port}: ")
    assert not any("Traceback" in line for line in lines)
