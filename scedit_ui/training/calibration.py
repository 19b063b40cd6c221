"""The default way to apply a freshly trained style tuner, chosen by measuring it (no style checker needed).

How strongly a style shows on new prompts depends on the pictures it was learned from: a tuner learned from an
uncaptioned folder may show nothing on both halves of guidance (guidance subtracts its caption-free side) and too
much as style guidance, another one the other way round (docs/training.md). So after training, each candidate
(scale, guidance half) makes images for a few new prompts, and the one whose texture comes closest to the training
pictures' without moving the prompt's colours too far becomes the file's default.

Texture: the power spectrum of the high-passed luminance, normalised to sum 1 (periodic strokes, dots or grain
show as peaks; flat shapes as edges). Colour drift: the mean absolute difference of 8x8 block means of the image
with the tuner and the image without it (same prompt and seed), in 0..1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from tuners import TunerMetadata

# (scale, conditional only, texture guidance): the paper's way first, so it wins ties. Texture guidance at 2 is
# where stripes showed most before the colours went (0.67x / 0.82 at 2, 0.76x / 0.42 at 2.5; docs/training.md).
CANDIDATES: tuple[tuple[float, bool, bool], ...] = ((1.0, False, False), (0.25, True, False), (0.5, True, False), (2.0, False, True))
# Measured on the shipped styles (docs/training.md): the paper's way drifts 0.14 for polka dots, where the checker
# finds it best (style + colour accuracy), and 0.20 for stripes, where style guidance at 0.25 is better on both.
MAX_COLOUR_DRIFT = 0.15
# Generic prompts for a base model other than the built-in one (whose calibration prompts are Shapes captions).
GENERIC_PROMPTS = ("a house by a lake", "a bowl of fruit on a table", "a portrait of a woman", "a city street")


@dataclass(frozen=True)
class CandidateScore:
    scale: float
    conditional_only: bool
    texture_gain: float  # 0: the base's texture, 1: the training pictures' texture
    colour_drift: float
    texture: bool = False  # texture guidance

    @property
    def how(self) -> str:
        return "texture guidance" if self.texture else "style guidance" if self.conditional_only else "both halves"


def texture_spectrum(image: Image.Image) -> np.ndarray:
    gray = np.asarray(image.convert("L"), np.float32) / 255.0
    high = gray - cv2.GaussianBlur(gray, (0, 0), 2.0)
    power = np.abs(np.fft.rfft2(high)) ** 2
    return (power / max(float(power.sum()), 1e-12)).ravel()


def texture_distance(spectrum: np.ndarray, reference: np.ndarray) -> float:
    """Half the L1 distance of two normalised spectra: 0 the same texture, 1 nothing in common."""
    return 0.5 * float(np.abs(spectrum - reference).sum())


def colour_drift(image: Image.Image, base: Image.Image) -> float:
    def blocks(picture: Image.Image) -> np.ndarray:
        return np.asarray(picture.convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float32) / 255.0

    return float(np.abs(blocks(image) - blocks(base)).mean())


def score_candidates(
    training_pictures: Sequence[Image.Image], base_images: Sequence[Image.Image],
    generate: Callable[[float, bool, bool], Sequence[Image.Image]],
) -> list[CandidateScore]:
    """Each candidate's texture gain and colour drift; `generate(scale, conditional_only, texture)` makes the
    images of the same prompts and seeds as `base_images`."""
    reference = np.mean([texture_spectrum(p) for p in training_pictures], axis=0)
    base_distance = np.mean([texture_distance(texture_spectrum(b), reference) for b in base_images])
    scores = []
    for scale, conditional_only, texture in CANDIDATES:
        images = generate(scale, conditional_only, texture)
        distance = np.mean([texture_distance(texture_spectrum(i), reference) for i in images])
        drift = np.mean([colour_drift(i, b) for i, b in zip(images, base_images)])
        gain = float((base_distance - distance) / max(base_distance, 1e-6))
        scores.append(CandidateScore(scale, conditional_only, gain, float(drift), texture))
    return scores


def describe_default(metadata: TunerMetadata) -> str:
    """One line on the default use a training measured, as the CLI and the Train tab show it ("" when not measured)."""
    if "default_use_measured" not in metadata.training:
        return ""
    how = ("as texture guidance (its fine texture; the base's colours)" if metadata.default_texture
           else "as style guidance (the prompt's half of guidance)" if metadata.default_conditional_only else "on both halves of guidance")
    return f"default use, measured on new prompts: scale {metadata.default_scale:g} {how}"


def choose_default(scores: Sequence[CandidateScore]) -> CandidateScore:
    """The largest texture gain among the candidates within the colour-drift limit (the paper's way if none is)."""
    kept = [s for s in scores if s.colour_drift <= MAX_COLOUR_DRIFT]
    return max(kept, key=lambda s: s.texture_gain) if kept else scores[0]
