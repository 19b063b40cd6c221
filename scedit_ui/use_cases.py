"""What a user can do with a loaded model, in one place: the UI tabs and the CLI both call these."""
from __future__ import annotations

import csv
import itertools
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scedit_ui import conditions
from scedit_ui.model_manager import GenerationResult, ProgressCallback
from scedit_ui.request import (
    PNG_GRID_KEY,
    PNG_RECIPE_KEY,
    SCHEDULERS,
    ConditionUse,
    GenerationRequest,
    SkipTuningSettings,
    attach_metadata,
    save_png,
)
from scedit_ui.shapes.evaluation import AdherenceReport, evaluate_adherence
from tuners.composition import DEFAULT_ALPHA_MODE
from tuners.validation import UserInputError

Generate = Callable[..., GenerationResult]  # ModelManager.generate(request, progress=None, cancel=None)
StageProgress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class ConditionRow:
    """One CSC condition: the kind to extract, its parameters, the tuner file and how to apply it."""

    kind: str
    params: dict[str, Any]
    tuner: Path | None = None
    alpha: float = 1.0
    step_range: tuple[float, float] = (0.0, 1.0)
    mask: Image.Image | None = None  # spatial α map (white: full α)
    skip_weights: tuple[float, ...] | None = None  # α per skip, e.g. from `tuners.skip_weight_preset`


def extract_conditions(
    picture: Image.Image | None, rows: list[ConditionRow], size: tuple[int, int], fit: str = "crop", progress: StageProgress | None = None,
) -> dict[str, Image.Image]:
    """Each row's condition image made from `picture` (cached: re-extracting unchanged rows is free)."""
    if picture is None:
        raise UserInputError("upload or draw a picture first")
    if not rows:
        raise UserInputError("choose at least one condition type")
    picture = conditions.normalize_image(picture)
    extracted = {}
    for i, row in enumerate(rows):
        if progress is not None:
            progress(i, len(rows), f"extracting {row.kind}")
        extracted[row.kind] = conditions.extract(picture, conditions.ConditionRequest(row.kind, size, fit, row.params)).image
    return extracted


def with_controls(
    base: GenerationRequest, picture: Image.Image | None, rows: list[ConditionRow], fit: str = "crop", alpha_mode: str = DEFAULT_ALPHA_MODE,
    second_picture: Image.Image | None = None, blend: float = 0.0, progress: StageProgress | None = None,
) -> tuple[GenerationRequest, dict[str, Image.Image]]:
    """`base` (with its size set) plus one CSC condition per row, extracted from `picture` and blended towards
    `second_picture` by `blend`; also returns the condition images."""
    missing = [row.kind for row in rows if row.tuner is None]
    if missing:
        raise UserInputError(f"choose a CSC tuner for: {', '.join(missing)} (train or import one in the Train / Tuners tabs)")
    size = (base.width, base.height)
    extracted = extract_conditions(picture, rows, size, fit, progress)
    blended = extract_conditions(second_picture, rows, size, fit) if second_picture is not None else {}
    uses = tuple(
        ConditionUse(
            tuner=str(row.tuner), image=extracted[row.kind], alpha=float(row.alpha), step_range=row.step_range,
            blend_image=blended.get(row.kind), blend=float(blend) if blended else 0.0,
            mask=row.mask, skip_weights=row.skip_weights,
        )
        for row in rows
    )
    return replace(base, conditions=base.conditions + uses, alpha_mode=alpha_mode), extracted


def interpolation_strip(
    generate: Generate, request: GenerationRequest, count: int, progress: ProgressCallback | None = None,
) -> list[tuple[float, GenerationResult]]:
    """`count` (blend, result) pairs with the same seed, the condition features blended from the first to the second picture."""
    if count < 2:
        raise UserInputError(f"an interpolation strip needs at least 2 images, got {count}")
    if not request.conditions or request.conditions[0].blend_image is None:
        raise UserInputError("add a second picture to interpolate towards")
    strip = []
    for i, blend in enumerate(np.linspace(0.0, 1.0, count)):
        uses = tuple(replace(use, blend=float(blend)) for use in request.conditions)

        def step(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress(i * total + done, count * total)

        strip.append((float(blend), generate(replace(request, conditions=uses, batch_size=1), progress=step)))
    return strip


def measure_adherence(
    generate: Generate, request: GenerationRequest, n: int, seed: int = 0, prompts: str = "heldout"
) -> AdherenceReport:
    """Score ``generate`` on ``n`` Shapes prompts of the set ``prompts`` (heldout | plain); each image uses
    ``request`` with its prompt and seed."""

    def image_for(prompt: str, image_seed: int) -> Image.Image:
        return generate(replace(request, prompt=prompt, seed=image_seed)).images[0]

    return evaluate_adherence(image_for, n, seed, prompts=prompts)


# -- compare grids (X/Y/Z plot) --------------------------------------------------------------------------------------

GRID_AXES = ("SC scale", "CSC α", "step range", "ρ inner", "steps", "guidance", "scheduler", "seed", "prompt S/R")
MAX_GRID_IMAGES = 64


@dataclass(frozen=True)
class GridAxis:
    """One axis of a compare grid: what it varies and its values, in order.

    `target` picks the SC tuner ("SC scale") or condition ("CSC α", "step range") of the request, 0 = the first.
    For "prompt S/R" the first value is the text to search for; every value replaces it in the prompts (A1111's
    "Prompt S/R"), so the first cell is the prompt as written.
    """

    kind: str
    values: tuple[Any, ...]
    target: int = 0

    def label(self, value: Any) -> str:
        if self.kind == "step range":
            return f"steps {value[0]:g}-{value[1]:g}"
        if self.kind == "prompt S/R":
            return str(value)
        return f"{self.kind} {value:g}" if isinstance(value, float) else f"{self.kind} {value}"

    def apply(self, request: GenerationRequest, value: Any) -> GenerationRequest:
        """`request` with this axis set to `value`."""
        if self.kind == "SC scale":
            uses = list(request.sc_tuners)
            uses[self.target] = replace(uses[self.target], scale=value)
            return replace(request, sc_tuners=tuple(uses))
        if self.kind in ("CSC α", "step range"):
            uses = list(request.conditions)
            field_name = "alpha" if self.kind == "CSC α" else "step_range"
            uses[self.target] = replace(uses[self.target], **{field_name: value})
            return replace(request, conditions=tuple(uses))
        if self.kind == "ρ inner":
            return replace(request, skip_tuning=replace(request.skip_tuning or SkipTuningSettings(), rho_inner=value))
        if self.kind == "prompt S/R":
            search = self.values[0]
            return replace(request, prompt=request.prompt.replace(search, value), negative_prompt=request.negative_prompt.replace(search, value))
        return replace(request, **{self.kind: value})  # steps, guidance, scheduler, seed

    def check_fits(self, request: GenerationRequest) -> None:
        """`UserInputError` unless `request` has what this axis varies."""
        uses = {"SC scale": ("SC tuner", request.sc_tuners), "CSC α": ("condition", request.conditions),
                "step range": ("condition", request.conditions)}
        if self.kind in uses:
            what, present = uses[self.kind]
            if not 0 <= self.target < len(present):
                raise UserInputError(f"the {self.kind} axis varies {what} {self.target + 1}, but the request has {len(present)} {what}s; add one first")
        if self.kind == "prompt S/R" and self.values[0] not in request.prompt + "\n" + request.negative_prompt:
            raise UserInputError(f"prompt S/R: {self.values[0]!r} is not in the prompt; the first value must be text the prompt contains")


def parse_axis(kind: str, text: str, target: int = 0) -> GridAxis:
    """A `GridAxis` from comma-separated values ("1, 2, 3"; step ranges as "0-0.5"; quote values that hold commas)."""
    if kind not in GRID_AXES:
        raise UserInputError(f"unknown grid axis {kind!r}; choose one of: {', '.join(GRID_AXES)}")
    try:
        items = [item.strip() for item in next(csv.reader([text], skipinitialspace=True), [])]
    except csv.Error as error:
        raise UserInputError(f"{kind} values {text!r} cannot be read: {error}") from None
    items = [item for item in items if item]
    if not items:
        raise UserInputError(f"give at least one value for the {kind} axis, separated by commas")
    values = tuple(_axis_value(kind, item) for item in items)
    if len(set(values)) != len(values) and kind != "prompt S/R":
        raise UserInputError(f"the {kind} axis lists a value twice: {text}")
    return GridAxis(kind, values, target)


def _axis_value(kind: str, item: str) -> Any:
    if kind == "prompt S/R":
        return item
    if kind == "scheduler":
        matches = [name for name in SCHEDULERS if name.lower() == item.lower()]
        if not matches:
            raise UserInputError(f"unknown scheduler {item!r} on the grid axis; choose from: {', '.join(SCHEDULERS)}")
        return matches[0]
    try:
        if kind in ("steps", "seed"):
            return int(item)
        if kind == "step range":
            start, end = (float(part) for part in item.split("-"))
            return (start, end)
        return float(item)
    except ValueError:
        example = {"steps": "10, 20", "seed": "1, 2, 3", "step range": "0-0.5, 0-1"}.get(kind, "0.5, 1.0")
        raise UserInputError(f"{kind} value {item!r} is not understood; write them like: {example}") from None


@dataclass
class GridResult:
    """The labelled grid (recipe of the grid in its metadata) and every cell image (its own recipe in its metadata)."""

    grid: Image.Image
    images: list[Image.Image]
    labels: list[tuple[str, ...]]  # per image: its value's label on each axis, X first


def grid_requests(request: GenerationRequest, axes: Sequence[GridAxis]) -> list[tuple[GenerationRequest, tuple[str, ...]]]:
    """One single-image request per grid cell, X varying fastest, then Y, then Z; bad grids raise before any work."""
    if not 1 <= len(axes) <= 3:
        raise UserInputError(f"a grid has 1 to 3 axes (X, Y, Z), got {len(axes)}")
    kinds = [axis.kind for axis in axes]
    if len(set(kinds)) != len(kinds):
        raise UserInputError(f"two grid axes vary the same thing ({', '.join(kinds)}); pick different ones")
    count = math.prod(len(axis.values) for axis in axes)
    if count > MAX_GRID_IMAGES:
        raise UserInputError(f"this grid has {count} images; the limit is {MAX_GRID_IMAGES}: use fewer values")
    base = replace(request, batch_size=1)
    for axis in axes:
        axis.check_fits(base)
    cells = []
    for combo in itertools.product(*(axis.values for axis in reversed(axes))):
        values = combo[::-1]  # X first
        cell = base
        for axis, value in zip(axes, values):
            cell = axis.apply(cell, value)
        cell.validated(native_size=cell.width or 512)  # every value is checked before the first image
        cells.append((cell, tuple(axis.label(value) for axis, value in zip(axes, values))))
    return cells


def run_grid(
    generate: Generate, request: GenerationRequest, axes: Sequence[GridAxis],
    progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
) -> GridResult:
    """Generate every cell of an X/Y(/Z) grid through `generate` and draw the labelled grid.

    The condition images are the same in every cell, so the model's feature cache computes their CSC features once.
    """
    cells = grid_requests(request, axes)
    total = sum(cell.steps for cell, _ in cells)
    images, done = [], 0
    for cell, _ in cells:
        def step(finished: int, steps: int, before: int = done) -> None:
            if progress is not None:
                progress(before + finished, total)

        images.append(generate(cell, progress=step, cancel=cancel).images[0])
        done += cell.steps
    grid = draw_grid(images, axes)
    model = json.loads(images[0].info[PNG_RECIPE_KEY])["model"]
    attach_metadata(grid, replace(request, batch_size=1), 0, request.seed, model)
    grid.info[PNG_GRID_KEY] = json.dumps({"axes": [{"kind": a.kind, "values": list(a.values), "target": a.target} for a in axes]})
    grid.info["parameters"] += "\nGrid: " + "; ".join(f"{name}: {a.kind} = {', '.join(a.label(v) for v in a.values)}" for name, a in zip("XYZ", axes))
    return GridResult(grid, images, [labels for _, labels in cells])


def draw_grid(images: Sequence[Image.Image], axes: Sequence[GridAxis]) -> Image.Image:
    """Cells in rows (Y) and columns (X), X labels on top, Y labels on the left; one block per Z value, side by side."""
    width, height = images[0].size
    counts = [len(axis.values) for axis in axes] + [1] * (3 - len(axes))
    nx, ny, nz = counts
    font = ImageFont.load_default(size=max(10, min(width, height) // 10))
    line = font.getbbox("Ag")[3] + 4
    x_axis, y_axis, z_axis = (list(axes) + [None, None])[:3]
    top = (2 * line if z_axis is not None else 0) + 2 * line
    left = 0
    y_lines = {}
    if y_axis is not None:
        y_lines = {v: _wrap(y_axis.label(v), font, width) for v in y_axis.values}
        left = max(font.getbbox(text)[2] for lines in y_lines.values() for text in lines) + 8
    gap = line
    block_w = left + nx * width
    canvas = Image.new("RGB", (nz * block_w + (nz - 1) * gap, top + ny * height), "white")
    draw = ImageDraw.Draw(canvas)
    for z in range(nz):
        x0 = z * (block_w + gap)
        if z_axis is not None:
            draw.text((x0 + left, 0), z_axis.label(z_axis.values[z]), fill="black", font=font)
        for x, value in enumerate(x_axis.values):
            for k, text in enumerate(_wrap(x_axis.label(value), font, width)[:2]):
                draw.text((x0 + left + x * width + 2, top - 2 * line + k * line), text, fill="black", font=font)
        for y in range(ny):
            if y_axis is not None:
                for k, text in enumerate(y_lines[y_axis.values[y]][: max(1, height // line)]):
                    draw.text((x0 + 2, top + y * height + k * line), text, fill="black", font=font)
            for x in range(nx):
                canvas.paste(images[(z * ny + y) * nx + x], (x0 + left + x * width, top + y * height))
    return canvas


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (long words are cut)."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width - 4 or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    return lines


def save_grid(result: GridResult, folder: Path, name: str = "grid") -> list[Path]:
    """Write the grid and every cell as PNG (with their metadata) into `folder`; returns the paths, grid first."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png"]
    save_png(result.grid, str(paths[0]))
    for i, image in enumerate(result.images):
        path = folder / f"{name}-{i:02d}.png"
        save_png(image, str(path))
        paths.append(path)
    return paths
