"""Compare grids (X/Y/Z plot): axis parsing, cell requests, the labelled grid and its metadata, on the built-in tiny model."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scedit_ui.model_manager import GenerationCancelled, ModelManager
from scedit_ui.request import PNG_GRID_KEY, ConditionUse, GenerationRequest, TunerUse, read_png_request
from scedit_ui.use_cases import GridAxis, grid_requests, parse_axis, run_grid, save_grid
from tuners import CSCTuner
from tuners.validation import UserInputError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CANNY = str(ASSETS / "tuners" / "canny.safetensors")
STRIPES = str(ASSETS / "tuners" / "style-stripes.safetensors")


@pytest.fixture(scope="module")
def tiny() -> ModelManager:
    manager = ModelManager("cpu")
    manager.load("")
    return manager


def edge_picture(size: int = 128) -> Image.Image:
    picture = np.zeros((size, size, 3), dtype=np.uint8)
    picture[32:96, 32:34] = picture[32:96, 94:96] = picture[32:34, 32:96] = picture[94:96, 32:96] = 255
    return Image.fromarray(picture)


BASE = GenerationRequest("a red circle on a blue background", steps=2, width=128, height=128)


# -- axes ------------------------------------------------------------------------------------------------------------


def test_axes_parse_numbers_ranges_schedulers_and_prompt_replacements():
    assert parse_axis("guidance", "3, 7.5").values == (3.0, 7.5)
    assert parse_axis("seed", "1,2,3").values == (1, 2, 3)
    assert parse_axis("step range", "0-0.5, 0.5-1").values == ((0.0, 0.5), (0.5, 1.0))
    assert parse_axis("scheduler", "ddim, euler a").values == ("DDIM", "Euler a")
    assert parse_axis("prompt S/R", 'red, "green, dark"').values == ("red", "green, dark")


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("guidance", "three", "is not understood; write them like: 0.5, 1.0"),
        ("steps", "", "at least one value"),
        ("seed", "1, 1", "lists a value twice"),
        ("scheduler", "PLMS", "unknown scheduler 'PLMS'"),
        ("size", "64", "unknown grid axis"),
    ],
)
def test_bad_axis_values_get_one_clear_message(kind, text, message):
    with pytest.raises(UserInputError, match=message):
        parse_axis(kind, text)


def test_cells_vary_x_fastest_and_prompt_s_r_replaces_the_search_text():
    cells = grid_requests(BASE, [parse_axis("prompt S/R", "red, green"), parse_axis("seed", "4, 5")])
    assert [(c.prompt.split()[1], c.seed) for c, _ in cells] == [("red", 4), ("green", 4), ("red", 5), ("green", 5)]
    assert cells[1][1] == ("green", "seed 4")


@pytest.mark.parametrize(
    ("axes", "request_change", "message"),
    [
        ([parse_axis("SC scale", "0.5, 1")], {}, "add one first"),
        ([parse_axis("prompt S/R", "purple, green")], {}, "is not in the prompt"),
        ([parse_axis("steps", "2, 0")], {}, "steps must be"),
        ([parse_axis("seed", "1, 2"), parse_axis("seed", "3")], {}, "vary the same thing"),
        ([parse_axis("seed", ",".join(map(str, range(9)))), parse_axis("guidance", ",".join(map(str, range(8))))], {}, "the limit is 64"),
    ],
)
def test_bad_grids_are_refused_before_any_image(axes, request_change, message):
    with pytest.raises(UserInputError, match=message):
        grid_requests(replace(BASE, **request_change), axes)


# -- running a grid through the manager ------------------------------------------------------------------------------


def test_a_grid_computes_the_condition_features_once_and_labels_every_cell(tiny, monkeypatch, tmp_path):
    computed = []
    original = CSCTuner.condition_features
    monkeypatch.setattr(CSCTuner, "condition_features", lambda self, image: computed.append(1) or original(self, image))
    tiny.editor.cache.clear()
    request = replace(BASE, conditions=(ConditionUse(CANNY, edge_picture()),), sc_tuners=(TunerUse(STRIPES, 1.0),))
    axes = [parse_axis("CSC α", "0.5, 1"), parse_axis("SC scale", "0, 1"), parse_axis("guidance", "3, 6")]
    progress = []
    result = run_grid(tiny.generate, request, axes, progress=lambda done, total: progress.append((done, total)))
    assert len(computed) == 1  # 8 images, 2 CFG halves × 2 steps each: the hint encoder ran once
    assert len(result.images) == 8 and progress[-1] == (16, 16)
    assert result.labels[5] == ("CSC α 1", "SC scale 0", "guidance 6")

    # The grid holds every cell unchanged, below the X labels and right of the Y labels; Z blocks side by side.
    grid = np.asarray(result.grid)
    cell = np.asarray(result.images[0])
    top = grid.shape[0] - 2 * 128  # two rows of cells under the labels
    left = next(x for x in range(grid.shape[1] - 128) if np.array_equal(grid[top : top + 128, x : x + 128], cell))
    assert np.array_equal(grid[top + 128 :, left + 128 : left + 256], np.asarray(result.images[3]))  # x = 1, y = 1
    assert (grid[:top, left : left + 128] < 128).any()  # an X label is drawn above the first column
    assert (grid[top : top + 128, :left] < 128).any()  # a Y label left of the first row

    paths = save_grid(result, tmp_path)
    assert [p.name for p in paths[:2]] == ["grid.png", "grid-00.png"] and len(paths) == 9
    cell_request, _, _ = read_png_request(paths[1 + 6])  # image 6: x = 0, y = 1, z = 1
    assert (cell_request.conditions[0].alpha, cell_request.sc_tuners[0].scale, cell_request.guidance) == (0.5, 1.0, 6.0)
    with Image.open(paths[0]) as saved:
        assert '"kind": "CSC \\u03b1"' in saved.info[PNG_GRID_KEY] and "Grid: X: CSC α" in saved.info["parameters"]


def test_each_cell_equals_the_same_request_generated_alone(tiny):
    result = run_grid(tiny.generate, BASE, [parse_axis("seed", "1, 2")])
    alone = tiny.generate(replace(BASE, seed=2)).images[0]
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(alone))


def test_a_cancelled_grid_stops_and_the_model_keeps_serving(tiny):
    cancel = threading.Event()
    done = []

    def generate(request, progress=None, cancel=None):
        done.append(request.seed)
        if len(done) == 2:
            cancel.set()
        return tiny.generate(request, progress=progress, cancel=cancel)

    with pytest.raises(GenerationCancelled):
        run_grid(generate, BASE, [parse_axis("seed", "1, 2, 3")], cancel=cancel)
    assert done == [1, 2]
    assert tiny.generate(BASE).images


def test_a_grid_axis_label_names_the_value():
    assert GridAxis("step range", ((0.0, 0.5),)).label((0.0, 0.5)) == "steps 0-0.5"
    assert GridAxis("ρ inner", (0.8,)).label(0.8) == "ρ inner 0.8"


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_grid_writes_the_grid_and_every_cell(tmp_path, capsys):
    from scedit_ui.cli import main

    picture = tmp_path / "edges.png"
    edge_picture().save(picture)
    code = main([
        "grid", "--prompt", "a red circle on a blue background", "--steps", "2", "--size", "64x64",
        "--control", f"{CANNY}:{picture}", "--x", "CSC α=0,1", "--y", "prompt S/R=red,green", "--out", str(tmp_path / "out"),
    ])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["grid.png", "grid-00.png", "grid-01.png", "grid-02.png", "grid-03.png"]
    request, _, _ = read_png_request(written[4])
    assert request.prompt.startswith("a green circle") and request.conditions[0].alpha == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--x", "seed"], "--x needs AXIS=VALUES"),
        (["--x", "CSC α=0,1"], "the CSC α axis varies condition 1, but the request has 0 conditions"),
        (["--x", "size=1,2"], "unknown grid axis 'size'"),
    ],
)
def test_cli_grid_refuses_bad_axes_in_one_line_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from scedit_ui import cli
    from scedit_ui.model_manager import ModelManager

    monkeypatch.setattr(ModelManager, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code = cli.main(["grid", "--prompt", "a red circle", "--out", str(tmp_path), *argv])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
