"""`python -m scedit_ui condition KIND --in IMAGE --out FILE.png [parameters]`."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scedit_ui.cli import main
from scedit_ui.conditions import annotators


@pytest.fixture
def square(tmp_path):
    path = tmp_path / "square.png"
    picture = Image.new("RGB", (128, 96), "black")
    ImageDraw.Draw(picture).rectangle((32, 24, 95, 71), fill="white")
    picture.save(path)
    return path


@pytest.fixture(autouse=True)
def offline_and_no_folder(monkeypatch, tmp_path):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(annotators.ANNOTATORS_ENV, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield
    annotators.set_annotators_dir(None)


def test_condition_writes_the_condition_at_the_requested_size(square, tmp_path):
    out = tmp_path / "canny.png"
    assert main(["condition", "canny", "--in", str(square), "--out", str(out), "--size", "64x48", "-p", "low=50", "-p", "high=150"]) == 0
    edges = Image.open(out)
    assert edges.size == (64, 48) and edges.mode == "RGB"
    assert np.asarray(edges).max() == 255


def test_condition_defaults_to_the_pictures_size(square, tmp_path):
    out = tmp_path / "colour.png"
    assert main(["condition", "color", "--in", str(square), "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 96)


def test_outpaint_can_write_its_mask(square, tmp_path):
    out, mask_out = tmp_path / "canvas.png", tmp_path / "mask.png"
    arguments = ["condition", "outpaint", "--in", str(square), "--out", str(out), "--mask-out", str(mask_out)]
    assert main([*arguments, "--size", "64x64", "--fit", "resize", "-p", "left=0.5", "-p", "top=0", "-p", "right=0", "-p", "bottom=0"]) == 0
    mask = np.asarray(Image.open(mask_out))
    assert np.all(mask[:, :32] == 255) and np.all(mask[:, 32:] == 0)


def test_inpaint_reads_a_mask_file(square, tmp_path):
    mask_path, out, mask_out = tmp_path / "mask.png", tmp_path / "inpaint.png", tmp_path / "used.png"
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (0, 0, 64, 96))
    mask.save(mask_path)
    arguments = ["condition", "inpaint", "--in", str(square), "--out", str(out), "--mask", str(mask_path), "--mask-out", str(mask_out)]
    assert main(arguments) == 0
    assert np.array_equal(np.asarray(Image.open(mask_out)), np.asarray(mask))
    assert np.all(np.asarray(Image.open(out))[:, :64] == 128)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["blur"], "unknown condition kind 'blur'"),
        (["canny", "-p", "low=abc"], "low must be a number"),
        (["canny", "-p", "sigma=2"], "no parameter 'sigma'"),
        (["canny", "-p", "low"], "NAME=VALUE"),
        (["canny", "--size", "big"], "WIDTHxHEIGHT"),
        (["canny", "--mask-out", "m.png"], "makes no mask"),
        (["canny", "--mask", "m.png"], "no parameter 'mask'"),
        (["inpaint", "--mask", "m.png"], "m.png: no such file"),
        (["hed"], "ControlNetHED.pth"),
        (["canny", "--annotators", "/no/such/folder"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(square, tmp_path, capsys, arguments, message):
    kind, *options = arguments
    code = main(["condition", kind, "--in", str(square), "--out", str(tmp_path / "out.png"), *options])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: ") and message in error
    assert error.count("\n") == 1


def test_hed_error_names_the_annotators_folder(square, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    assert main(["condition", "hed", "--in", str(square), "--out", str(tmp_path / "h.png"), "--annotators", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err


def test_a_file_that_is_not_a_picture_exits_2(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    result = subprocess.run(
        [sys.executable, "-m", "scedit_ui", "condition", "canny", "--in", str(text), "--out", str(tmp_path / "o.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {text} is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF, ...)"]


def test_help_lists_every_kind_with_its_parameters(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["condition", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for kind in ("canny", "color", "inpaint", "outpaint", "sketch", "scribble", "hed", "depth", "pose", "seg"):
        assert f"  {kind} " in help_text
    assert "low=100, high=200" in help_text
