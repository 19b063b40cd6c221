"""What a user can do with a loaded model, in one place: the UI tabs and the CLI both call these."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from scedit_ui.model_manager import GenerationResult
from scedit_ui.request import GenerationRequest
from scedit_ui.shapes.evaluation import AdherenceReport, evaluate_adherence

Generate = Callable[[GenerationRequest], GenerationResult]


def measure_adherence(generate: Generate, request: GenerationRequest, n: int, seed: int = 0) -> AdherenceReport:
    """Score ``generate`` on ``n`` held-out Shapes prompts; each image uses ``request`` with its prompt and seed."""

    def image_for(prompt: str, image_seed: int) -> Image.Image:
        return generate(replace(request, prompt=prompt, seed=image_seed)).images[0]

    return evaluate_adherence(image_for, n, seed)
