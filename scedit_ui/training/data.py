"""Training examples: a folder of the user's images with captions, or the Shapes world; condition images for CSC."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from scedit_ui import conditions
from scedit_ui.shapes.world import COLORS, STYLES, caption, render_scene, sample_scene
from scedit_ui.training.config import CLUTTER, DEFAULT_SHAPES_IMAGES, IMAGE_SUFFIXES, TrainingConfig
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)


def prepare_caption(text: str, trigger: str | None = None, remove_words: Sequence[str] = ()) -> str:
    """`text` without the `remove_words` phrases (case-insensitive, whole words), prefixed by `trigger`."""
    for phrase in remove_words:
        text = re.sub(rf"(?i)(?<!\w){re.escape(phrase)}(?!\w)", " ", text)
    # Tidy what a removal leaves: doubled spaces, space before punctuation, dangling commas.
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    text = text.strip(" ,;:")
    return f"{trigger} {text}".strip() if trigger else text


class TrainingData:
    """Examples (caption, image at the training resolution) by key: a finite set or an endless stream.

    `size` is None for a stream (Shapes world), whose keys are scene seeds instead of indices.
    """

    def __init__(self, description: str, size: int | None, caption: Callable[[int], str], image: Callable[[int, int], Image.Image]) -> None:
        self.description = description
        self.size = size
        self.caption = caption
        self.image = image

    def preview_keys(self, count: int) -> list[int]:
        """Fixed keys for previews: the first examples of a set; seeds outside the training stream's range."""
        return list(range(min(count, self.size))) if self.size is not None else [2**48 + k for k in range(count)]


def load_training_data(config: TrainingConfig) -> TrainingData:
    """The dataset `config.data` names, fully validated (every image decoded, every caption found)."""
    source = config.data.strip()
    if source == CLUTTER:
        return _clutter_data(config)
    if source == "shapes" or source.startswith("shapes:"):
        return _shapes_data(config, source.partition(":")[2].strip() or None)
    return _folder_data(config, Path(source).expanduser())


def _shapes_data(config: TrainingConfig, style: str | None) -> TrainingData:
    if style is not None and style not in STYLES:
        raise UserInputError(f"unknown Shapes-world style {style!r}; use shapes:<style> with one of: {', '.join(STYLES)}")

    def text_of(scene) -> str:
        return prepare_caption(caption(scene), config.trigger, config.remove_words)

    count = config.shapes_images if config.shapes_images is not None else (DEFAULT_SHAPES_IMAGES if config.kind == "sc" else None)
    name = f"Shapes world{f' ({style})' if style else ''}"
    if count is None:
        def scene_of(key: int):
            return sample_scene(key, split="train", style=style)

        return TrainingData(f"{name}, endless stream", None, lambda k: text_of(scene_of(k)), lambda k, r: render_scene(scene_of(k), r))
    # Scene seeds depend on the run's seed only: a longer set extends a shorter one.
    seeds = np.random.default_rng([config.seed, 0x5CED]).integers(0, 2**48, size=count)
    scenes = [sample_scene(int(s), split="train", style=style) for s in seeds]
    return TrainingData(f"{name}, {count} scenes", count, lambda i: text_of(scenes[i]), lambda i, r: render_scene(scenes[i], r))


def _clutter_data(config: TrainingConfig) -> TrainingData:
    """Plain Shapes scenes with random strokes, outlines and polygons drawn over them, which the captions do not
    name: a condition tuner trained on them has to follow the edges of the condition, not the shapes it expects."""

    def picture(key: int, resolution: int) -> Image.Image:
        return draw_clutter(render_scene(sample_scene(key, split="train"), resolution), np.random.default_rng([key, 0xC1]))

    def text(key: int) -> str:
        return prepare_caption(caption(sample_scene(key, split="train")), config.trigger, config.remove_words)

    return TrainingData("Shapes world with clutter, endless stream", None, text, picture)


def draw_clutter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` with 2–9 random lines, polylines, ellipse arcs and small filled polygons in random colours."""
    canvas = np.array(image.convert("RGB"))
    size = min(canvas.shape[:2])
    colours = list(COLORS.values())
    for _ in range(int(rng.integers(2, 10))):
        colour = tuple(int(c) for c in colours[int(rng.integers(len(colours)))])
        width = int(rng.integers(1, max(2, size // 40)))
        kind = rng.choice(["line", "polyline", "arc", "polygon"])
        if kind == "line":
            a, b = (tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2))
            cv2.line(canvas, a, b, colour, width, cv2.LINE_AA)
        elif kind == "polyline":
            points = rng.integers(0, size, (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.polylines(canvas, [points], bool(rng.random() < 0.5), colour, width, cv2.LINE_AA)
        elif kind == "polygon":  # small, so the captioned shapes mostly stay visible
            centre, radius = rng.uniform(0, size, 2), rng.uniform(size / 12, size / 5)
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            points = centre + radius * rng.uniform(0.5, 1.0, (len(angles), 1)) * np.stack([np.cos(angles), np.sin(angles)], 1)
            cv2.fillPoly(canvas, [points.astype(np.int32)], colour, cv2.LINE_AA)
        else:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(size // 16, size // 2, 2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(90, 360)), colour, width, cv2.LINE_AA)
    return Image.fromarray(canvas)


def _folder_data(config: TrainingConfig, folder: Path) -> TrainingData:
    if not folder.is_dir():
        raise UserInputError(f"training data {folder} is not a folder; pass a folder of images with captions, or shapes:<style>")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserInputError(
            f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}); put the training pictures there, each with a caption"
        )
    listed = _read_metadata_jsonl(folder / "metadata.jsonl")
    captions, missing = [], []
    for path in files:
        sidecar = path.with_suffix(".txt")
        if path.name in listed:
            captions.append(listed[path.name])
        elif sidecar.is_file():
            captions.append(sidecar.read_text(encoding="utf-8", errors="replace").strip())
        else:
            missing.append(path.name)
    if len(missing) == len(files):
        # No captions at all: the trigger word alone (or nothing) stands for every picture, the usual few-shot setup.
        logger.info("%s has no captions; training on the images with %r as the caption", folder, config.trigger or "")
        captions = [""] * len(files)
    elif missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserInputError(
            f"{len(missing)} of {len(files)} images in {folder} have no caption: {shown}. Write NAME.txt next to each "
            'image, or a metadata.jsonl with lines {"file_name": "NAME.png", "text": "the caption"} (or give no image a caption)'
        )
    for path in files:  # decode every picture now: a broken file must not stop training at step 900
        try:
            conditions.load_image(path, name=path.name)
        except UserInputError as error:
            raise UserInputError(f"cannot train on {path.name}: {error}. Remove or replace it") from None
    captions = [prepare_caption(text, config.trigger, config.remove_words) for text in captions]

    @lru_cache(maxsize=1024)
    def image(index: int, resolution: int) -> Image.Image:
        fitted, _ = conditions.fit_image(conditions.load_image(files[index]), (resolution, resolution), "crop")  # Resize + CenterCrop
        return fitted

    return TrainingData(f"{folder} ({len(files)} images)", len(files), captions.__getitem__, image)


def _read_metadata_jsonl(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry.get("text", entry.get("caption"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserInputError(f'{path} line {number} is not {{"file_name": ..., "text": ...}}: {line[:80]!r}') from None
        if not isinstance(text, str):
            raise UserInputError(f"{path} line {number} has no caption text for {name!r}")
        captions[Path(str(name)).name] = text
    return captions


def make_condition(image: Image.Image, kind: str, params: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """The condition image of `kind` for a training picture, with random augmentation where the paper has it:
    random Canny thresholds, random LaMa-style inpainting masks. Fixed `params` switch augmentation off."""
    size = image.size
    if kind == "canny" and not params:
        low, high = conditions.random_canny_thresholds(rng)
        params = {"low": low, "high": high}
    if kind == "inpaint":
        mask = params.get("mask") or conditions.random_inpaint_mask(size, rng)
        return conditions.inpaint_condition(image, mask)
    if kind == "color" and "ratio" not in params:
        params = {"ratio": max(1, size[0] // 8)}  # an 8x8 grid at every size (SD's 64x at 512 px)
    return conditions.extract(image, conditions.ConditionRequest(kind, size, "crop", params), cache=None).image


