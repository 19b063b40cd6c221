"""Built-in condition extractors, geometry, the cache, picture loading and the missing-weights error path."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scedit_ui import conditions
from scedit_ui.conditions import (
    CONDITION_KINDS,
    MASK_FILL,
    ConditionCache,
    ConditionRequest,
    annotators,
    extract,
    extract_condition,
    load_image,
    load_mask,
)
from tuners.validation import UserInputError

BUILT_IN_KINDS = [name for name, kind in CONDITION_KINDS.items() if not kind.annotator_models]
MODEL_KINDS = [name for name, kind in CONDITION_KINDS.items() if kind.annotator_models]


def square_picture(size: int = 128, box: tuple[int, int, int, int] = (32, 32, 95, 95)) -> Image.Image:
    picture = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(picture).rectangle(box, fill="white")
    return picture


def two_colour_picture(width: int = 128, height: int = 128) -> Image.Image:
    picture = Image.new("RGB", (width, height), (255, 0, 0))
    picture.paste((0, 0, 255), (width // 2, 0, width, height))
    return picture


def png_bytes(picture: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=save_args.pop("format", "PNG"), **save_args)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def fresh_state():
    conditions.CONDITION_CACHE.clear()
    yield
    conditions.CONDITION_CACHE.clear()
    annotators.set_annotators_dir(None)


# --- canny ----------------------------------------------------------------------------------------------------


def test_canny_edges_lie_on_the_drawn_square():
    edges = np.asarray(extract_condition(square_picture(), "canny", (128, 128)))[:, :, 0] > 0
    rows, cols = np.nonzero(edges)
    distance_to_border = np.minimum(
        np.minimum(np.abs(rows - 32), np.abs(rows - 95)), np.minimum(np.abs(cols - 32), np.abs(cols - 95))
    )
    inside_band = (rows >= 30) & (rows <= 97) & (cols >= 30) & (cols <= 97)
    assert edges.sum() > 4 * 60  # the whole perimeter, not a few pixels
    assert np.all(inside_band & (distance_to_border <= 1))
    for side in (edges[31:34, 40:88], edges[94:97, 40:88], edges[40:88, 31:34].T, edges[40:88, 94:97].T):
        assert side.any(axis=0).all()  # every column of each side has its edge


def test_canny_defaults_are_100_and_200():
    assert CONDITION_KINDS["canny"].defaults() == {"low": 100, "high": 200}


def test_canny_thresholds_change_what_counts_as_an_edge():
    faint = Image.new("RGB", (64, 64), (100, 100, 100))
    faint.paste((130, 130, 130), (0, 0, 32, 64))
    assert np.asarray(extract_condition(faint, "canny", (64, 64))).max() == 0
    assert np.asarray(extract_condition(faint, "canny", (64, 64), low=10, high=20)).max() == 255


def test_canny_refuses_low_above_high():
    with pytest.raises(UserInputError, match="low threshold"):
        extract_condition(square_picture(), "canny", (64, 64), low=150, high=100)


def test_random_canny_thresholds_are_reproducible_and_ordered():
    draws = [conditions.random_canny_thresholds(np.random.default_rng(seed)) for seed in range(50)]
    assert draws == [conditions.random_canny_thresholds(np.random.default_rng(seed)) for seed in range(50)]
    assert all(50 <= low <= 150 and low + 50 <= high <= low + 150 for low, high in draws)
    assert len(set(draws)) > 10


# --- colour ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(128, 128), (256, 128)])
def test_colour_map_keeps_each_colour_in_its_half(size):
    width, height = size
    colour = np.asarray(extract_condition(two_colour_picture(width, height), "color", size))
    assert colour.shape == (height, width, 3)
    assert np.all(colour[:, : width // 2] == (255, 0, 0))
    assert np.all(colour[:, width // 2 :] == (0, 0, 255))


def test_colour_map_cells_straddling_the_border_mix_the_colours():
    colour = np.asarray(extract_condition(two_colour_picture(200, 136), "color", (200, 136)))  # 3 x 2 cells of 64
    assert np.all(colour[:, :66] == (255, 0, 0)) and np.all(colour[:, 134:] == (0, 0, 255))
    middle = colour[:, 100].astype(int)
    assert np.all((middle[:, 0] > 50) & (middle[:, 2] > 50))


def test_colour_map_is_blocky_at_the_ratio():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    colour = np.asarray(extract_condition(picture, "color", (128, 128), ratio=32))
    assert len(np.unique(colour.reshape(-1, 3), axis=0)) <= 16
    assert np.all(colour[:32, :32] == colour[0, 0])


# --- inpainting ------------------------------------------------------------------------------------------------


def test_inpaint_condition_fills_the_masked_area_with_grey():
    picture = two_colour_picture(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 20, 30, 40))
    masked = np.asarray(conditions.inpaint_condition(picture, mask))
    assert np.all(masked[20:40, 10:30] == MASK_FILL)
    outside = np.ones((64, 64), bool)
    outside[20:40, 10:30] = False
    assert np.array_equal(masked[outside], np.asarray(picture)[outside])


def test_inpaint_with_a_drawn_mask_follows_the_fit():
    picture = two_colour_picture(128, 64)  # wide: "pad" to a square adds bars above and below
    mask = Image.new("RGBA", (128, 64), (0, 0, 0, 0))  # transparent, with an opaque stroke = area to generate
    ImageDraw.Draw(mask).rectangle((0, 0, 63, 63), fill=(255, 255, 255, 255))
    condition = extract(picture, ConditionRequest("inpaint", (64, 64), "pad", {"mask": mask}))
    generated = np.asarray(condition.mask) == 255
    assert generated[:16].all() and generated[48:].all()  # padding is unknown: masked
    assert generated[16:48, :32].all() and not generated[16:48, 32:].any()
    image = np.asarray(condition.image)
    assert np.all(image[generated] == MASK_FILL)
    assert np.all(image[16:48, 33:] == (0, 0, 255))


def test_inpaint_refuses_a_mask_of_another_shape():
    with pytest.raises(UserInputError, match="aspect ratio"):
        extract_condition(two_colour_picture(128, 64), "inpaint", (64, 64), mask=Image.new("L", (64, 64), 255))


def test_inpaint_without_mask_uses_a_seeded_random_mask():
    picture = two_colour_picture()
    first = extract(picture, ConditionRequest("inpaint", (96, 96), params={"seed": 3}), cache=None)
    again = extract(picture, ConditionRequest("inpaint", (96, 96), params={"seed": 3}), cache=None)
    other = extract(picture, ConditionRequest("inpaint", (96, 96), params={"seed": 4}), cache=None)
    assert np.array_equal(np.asarray(first.mask), np.asarray(again.mask))
    assert not np.array_equal(np.asarray(first.mask), np.asarray(other.mask))


def test_random_inpaint_masks_are_lama_like():
    masks = [np.asarray(conditions.random_inpaint_mask((128, 96), np.random.default_rng(seed))) for seed in range(20)]
    coverages = [np.count_nonzero(m) / m.size for m in masks]
    assert all(set(np.unique(m)) <= {0, 255} and m.shape == (96, 128) for m in masks)
    assert all(0 < c <= 0.75 for c in coverages)
    assert np.mean(coverages) > 0.05  # thick strokes, not hairlines
    again = np.asarray(conditions.random_inpaint_mask((128, 96), np.random.default_rng(0)))
    assert np.array_equal(masks[0], again)


def test_load_mask_reads_white_as_the_area_to_generate():
    drawn = Image.new("RGB", (32, 32), "black")
    drawn.paste((255, 255, 255), (0, 0, 16, 32))
    mask = np.asarray(load_mask(png_bytes(drawn)))
    assert mask.dtype == np.uint8 and np.all(mask[:, :16] == 255) and np.all(mask[:, 16:] == 0)


# --- outpainting -----------------------------------------------------------------------------------------------


def test_outpaint_extends_the_canvas_by_the_chosen_borders():
    picture = two_colour_picture(70, 60)
    canvas, mask = conditions.outpaint_condition(picture, (100, 80), left=0.1, top=0.25, right=0.2, bottom=0.0, fit="resize")
    canvas, mask = np.asarray(canvas), np.asarray(mask)
    kept = np.zeros((80, 100), bool)
    kept[20:80, 10:80] = True  # x 10..80 (70 px), y 20..80 (60 px)
    assert np.array_equal(mask == 0, kept)
    assert np.all(mask[~kept] == 255)
    assert np.all(canvas[~kept] == MASK_FILL)
    assert np.array_equal(canvas[20:80, 10:80], np.asarray(picture))


def test_outpaint_through_extract_returns_canvas_and_mask_at_the_size():
    condition = extract(two_colour_picture(), ConditionRequest("outpaint", (96, 64)))
    assert condition.image.size == condition.mask.size == (96, 64)
    assert np.asarray(condition.mask)[0].min() == 255  # default borders on every side


def test_outpaint_refuses_borders_that_leave_no_picture():
    with pytest.raises(UserInputError, match="no room"):
        extract_condition(two_colour_picture(), "outpaint", (64, 64), left=0.5, right=0.5)


# --- sketches and scribbles --------------------------------------------------------------------------------------


def line_drawing(ink: str = "black", paper: str = "white") -> Image.Image:
    drawing = Image.new("RGB", (96, 96), paper)
    ImageDraw.Draw(drawing).line((10, 48, 86, 48), fill=ink, width=2)
    return drawing


@pytest.mark.parametrize("ink, paper", [("black", "white"), ("white", "black")])
def test_sketch_gives_white_lines_on_black_whatever_the_paper(ink, paper):
    sketch = np.asarray(extract_condition(line_drawing(ink, paper), "sketch", (96, 96)))[:, :, 0]
    assert set(np.unique(sketch)) == {0, 255}
    assert np.all(sketch[46:51, 12:84].max(axis=0) == 255)  # the line, unbroken
    assert sketch[:40].max() == 0 and sketch[56:].max() == 0


def test_sketch_invert_can_be_forced():
    sketch = np.asarray(extract_condition(line_drawing(), "sketch", (96, 96), invert="no"))[:, :, 0]
    assert sketch[0, 0] == 255 and sketch[48, 48] == 0


def test_scribble_thickens_the_lines():
    drawing = line_drawing()
    sketch = np.asarray(extract_condition(drawing, "sketch", (96, 96)))
    scribble = np.asarray(extract_condition(drawing, "scribble", (96, 96), thickness=7))
    assert (scribble == 255).sum() > 2 * (sketch == 255).sum()
    assert np.all(scribble[sketch == 255] == 255)


# --- every kind: size, mode, fit, determinism --------------------------------------------------------------------


@pytest.mark.parametrize("fit", conditions.FIT_MODES)
@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_every_built_in_kind_returns_rgb_at_the_generation_size(kind, fit):
    condition = extract_condition(square_picture(), kind, (80, 48), fit=fit)
    assert condition.mode == "RGB" and condition.size == (80, 48)


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_extraction_is_deterministic(kind):
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    first = extract(picture, ConditionRequest(kind, (64, 64)), cache=None)
    second = extract(picture, ConditionRequest(kind, (64, 64)), cache=None)
    assert first is not second
    assert first.image.tobytes() == second.image.tobytes()


def test_pad_leaves_black_bars_outside_the_picture():
    wide = Image.new("RGB", (200, 100), "white")
    colour = np.asarray(extract_condition(wide, "color", (100, 100), fit="pad", ratio=1))
    assert np.all(colour[:25] == 0) and np.all(colour[75:] == 0) and np.all(colour[25:75] == 255)


def test_crop_keeps_the_centre_and_resize_keeps_everything():
    wide = Image.new("RGB", (200, 100), "red")
    wide.paste((0, 0, 255), (0, 0, 50, 100))  # a blue quarter on the left
    cropped = np.asarray(extract_condition(wide, "color", (100, 100), fit="crop", ratio=1))
    resized = np.asarray(extract_condition(wide, "color", (100, 100), fit="resize", ratio=1))
    assert np.all(cropped == (255, 0, 0))
    assert np.all(resized[:, :20] == (0, 0, 255))


# --- requests and the cache --------------------------------------------------------------------------------------


def test_cache_returns_the_same_object_for_the_same_input():
    picture = square_picture()
    first = extract_condition(picture, "canny", (64, 64))
    assert extract_condition(picture.copy(), "canny", (64, 64), low=100) is first
    assert extract_condition(picture, "canny", (64, 64), low=50) is not first
    assert extract_condition(picture, "canny", (64, 64), fit="pad") is not first
    changed = picture.copy()
    changed.putpixel((0, 0), (1, 1, 1))
    assert extract_condition(changed, "canny", (64, 64)) is not first


def test_cache_keys_drawn_masks_by_content():
    picture = two_colour_picture(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 8, 8))
    first = extract_condition(picture, "inpaint", (64, 64), mask=mask)
    assert extract_condition(picture, "inpaint", (64, 64), mask=mask.copy()) is first
    mask.paste(255, (0, 0, 32, 32))
    assert extract_condition(picture, "inpaint", (64, 64), mask=mask) is not first


def test_cache_is_bounded_and_least_recently_used():
    cache = ConditionCache(maxsize=2)
    picture = square_picture(64)
    requests = [ConditionRequest("canny", (32, 32), params={"low": low}) for low in (10, 20, 30)]
    first = extract(picture, requests[0], cache=cache)
    extract(picture, requests[1], cache=cache)
    assert extract(picture, requests[0], cache=cache) is first  # touched: now most recent
    extract(picture, requests[2], cache=cache)  # evicts requests[1]
    assert len(cache) == 2
    assert extract(picture, requests[0], cache=cache) is first
    assert cache.get(requests[1].cache_key(conditions.image_digest(picture))) is None


def test_requests_fill_defaults_so_equal_meanings_compare_equal():
    assert ConditionRequest("canny", (64, 64)) == ConditionRequest("canny", [64, 64], "crop", {"high": 200})
    assert ConditionRequest("color", (64, 64)).params == (("ratio", 0),)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("blur", (64, 64)), "unknown condition kind"),
        (("canny", (64, 64), "stretch"), "fit must be"),
        (("canny", (0, 64)), "out of range"),
        (("canny", (64, 64), "crop", {"sigma": 2}), "no parameter 'sigma'"),
        (("canny", (64, 64), "crop", {"low": -1}), "low must be a whole number from 0 to 1000"),
        (("canny", (64, 64), "crop", {"low": 1.5}), "whole number"),
        (("hed", (64, 64), "crop", {"safe": "maybe"}), "true or false"),
        (("seg", (64, 64), "crop", {"model": "unet"}), "one of"),
    ],
)
def test_bad_requests_are_refused_clearly(arguments, message):
    with pytest.raises(UserInputError, match=message):
        ConditionRequest(*arguments)


def test_every_kind_lists_its_parameters_with_defaults():
    for kind in CONDITION_KINDS.values():
        for spec in kind.params:
            assert spec.validate(spec.default) == spec.default
            assert spec.help
    assert set(BUILT_IN_KINDS) == {"canny", "color", "inpaint", "outpaint", "sketch", "scribble"}
    assert set(MODEL_KINDS) == {"hed", "depth", "pose", "seg"}


# --- loading pictures ----------------------------------------------------------------------------------------


def test_load_image_composites_transparency_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 4, 8))
    loaded = np.asarray(load_image(png_bytes(rgba)))
    assert np.all(loaded[:, :4] == (0, 255, 0)) and np.all(loaded[:, 4:] == 255)


def test_load_image_reads_palette_grayscale_and_16_bit():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    palette_bytes = png_bytes(palette, transparency=0)
    assert np.all(np.asarray(load_image(palette_bytes))[:, :4] == 255)
    assert np.all(np.asarray(load_image(palette_bytes))[:, 4:] == (10, 20, 30))

    gray = load_image(png_bytes(Image.new("L", (8, 8), 77)))
    assert gray.mode == "RGB" and np.all(np.asarray(gray) == 77)

    deep = np.zeros((8, 8), np.uint16)
    deep[:, 4:] = 65535
    deep[:, 2:4] = 32896
    loaded = np.asarray(load_image(png_bytes(Image.fromarray(deep))))
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 8, 3)
    assert np.all(loaded[:, :2] == 0) and np.all(loaded[:, 2:4] == 128) and np.all(loaded[:, 4:] == 255)


def test_load_image_applies_exif_rotation():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # red left, blue right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    loaded = load_image(png_bytes(stored, format="JPEG", exif=exif, quality=95))
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10].astype(int), np.asarray(loaded)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_reads_paths(tmp_path):
    path = tmp_path / "picture.webp"
    two_colour_picture(32, 32).save(path, lossless=True)
    assert load_image(path).size == load_image(str(path)).size == (32, 32)


def forged_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height`: huge to open, tiny on disk."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_load_image_refuses_pictures_over_the_pixel_limit_before_decoding(side):
    with pytest.raises(UserInputError, match="megapixels|too large"):
        load_image(forged_png(side, side))


def test_load_image_limit_is_adjustable():
    picture = png_bytes(two_colour_picture(64, 64))
    with pytest.raises(UserInputError, match="over the limit"):
        load_image(picture, max_pixels=1000)
    assert load_image(picture, max_pixels=4096).size == (64, 64)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"this is not a picture", "not an image"),
        (b"", "not an image"),
        ("/no/such/picture.png", "no such file"),
        (png_bytes(Image.new("RGB", (64, 64), "red"))[:60], "truncated|corrupt|not an image|cannot read"),
    ],
)
def test_load_image_refuses_non_images_clearly(source, message):
    with pytest.raises(UserInputError, match=message):
        load_image(source)


def test_extract_refuses_oversized_in_memory_pictures():
    with pytest.raises(UserInputError, match="over the limit"):
        conditions.normalize_image(Image.new("L", (64, 64)), max_pixels=100)


# --- model-based kinds without weights -----------------------------------------------------------------------------


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants

    empty = tmp_path / "annotators"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(annotators.ANNOTATORS_ENV, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    annotators.clear_annotator_models()
    annotators.set_annotators_dir(empty)
    yield empty
    annotators.clear_annotator_models()


@pytest.mark.parametrize(
    "kind, params, filename",
    [
        ("hed", {}, "ControlNetHED.pth"),
        ("depth", {}, "dpt_hybrid-midas-501f0c75.pt"),
        ("pose", {}, "body_pose_model.pth"),
        ("seg", {}, "config.json"),
        ("seg", {"model": "upernet-convnext-small"}, "upernet-convnext-small"),
    ],
)
def test_missing_weights_name_the_file_and_every_place_looked(no_weights_anywhere, kind, params, filename):
    with pytest.raises(UserInputError) as caught:
        extract_condition(square_picture(64), kind, (64, 64), **params)
    message = str(caught.value)
    assert filename in message
    assert str(no_weights_anywhere) in message
    assert "Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "hf download" in message and annotators.ANNOTATORS_ENV in message
    assert "\n" not in message


def test_missing_weights_list_the_environment_folders_too(no_weights_anywhere, tmp_path, monkeypatch):
    other = tmp_path / "from-env"
    other.mkdir()
    monkeypatch.setenv(annotators.ANNOTATORS_ENV, str(other))
    with pytest.raises(UserInputError) as caught:
        extract_condition(square_picture(64), "hed", (64, 64))
    assert str(no_weights_anywhere) in str(caught.value) and str(other) in str(caught.value)


def test_annotators_folder_must_exist(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        annotators.set_annotators_dir(tmp_path / "missing")


def test_importing_the_app_loads_no_annotator():
    code = (
        "import sys, scedit_ui.conditions, scedit_ui.conditions.annotators; "
        "heavy = [m for m in ('controlnet_aux', 'torch', 'transformers', 'timm') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "import scedit_ui.cli; scedit_ui.cli.build_parser(); "
        "assert 'controlnet_aux' not in sys.modules; "
        "assert not scedit_ui.conditions.annotators._models"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
