"""Measure how well the loaded base model follows Shapes-world prompts it never saw in training."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from scedit_ui.checker import score_adherence
from scedit_ui.model_manager import ModelManager
from scedit_ui.request import GenerationRequest
from scedit_ui.shapes_world import caption, sample_scene

logger = logging.getLogger(__name__)


@dataclass
class AdherenceReport:
    n: int
    steps: int
    guidance: float
    color_accuracy: float
    shape_accuracy: float
    position_accuracy: float
    count_accuracy: float
    background_accuracy: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_adherence(
    manager: ModelManager,
    n: int = 200,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    scheduler: str = "DDIM",
    progress: Callable[[int, int], None] | None = None,
) -> AdherenceReport:
    """Generate one image per held-out scene (prompt seed i, image seed i) and score it with the checker.

    Held-out scenes combine colour × shape × background × position in ways the tiny model never saw.
    """
    started = time.perf_counter()
    scores = []
    for i in range(n):
        scene = sample_scene(seed + i, split="heldout")
        request = GenerationRequest(prompt=caption(scene), seed=seed + i, steps=steps, guidance=guidance, scheduler=scheduler)
        image = manager.generate(request).images[0]
        scores.append(score_adherence(image, scene))
        if progress is not None:
            progress(i + 1, n)
    def mean(values) -> float:
        return float(np.mean([float(v) for v in values]))

    return AdherenceReport(
        n=n,
        steps=steps,
        guidance=guidance,
        color_accuracy=mean(s.color_correct for s in scores),
        shape_accuracy=mean(s.shape_correct for s in scores),
        position_accuracy=mean(s.position_correct for s in scores),
        count_accuracy=mean(s.count_correct for s in scores),
        background_accuracy=mean(s.background_correct for s in scores),
        seconds=time.perf_counter() - started,
    )
