"""What a user can do with a loaded model, in one place: the UI tabs and the CLI both call these."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scedit_ui import conditions
from scedit_ui.errors import UserInputError
from scedit_ui.model_manager import GenerationResult, ProgressCallback
from scedit_ui.request import ConditionUse, GenerationRequest
from scedit_ui.shapes.evaluation import AdherenceReport, evaluate_adherence

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
    base: GenerationRequest, picture: Image.Image | None, rows: list[ConditionRow], fit: str = "crop", normalise_alpha: bool = False,
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
        )
        for row in rows
    )
    return replace(base, conditions=base.conditions + uses, normalise_alpha=bool(normalise_alpha)), extracted


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
