"""Condition images for controllable generation (SCEdit paper, appendix A.4), used by the UI, the CLI and training.

Every condition is an RGB image at the generation size, computed from the user's picture:

- built in, no weights: ``canny``, ``color``, ``inpaint``, ``outpaint``, ``sketch``, ``scribble``;
- model-based through controlnet-aux / transformers (see `scedit_ui.annotators` for where weights come
  from): ``hed``, ``depth`` (MiDaS), ``pose`` (OpenPose), ``seg`` (ADE20K semantic segmentation).

The picture is first brought to the generation size by `fit_image` ("crop": scale to cover and centre-crop,
"resize": stretch, "pad": scale to fit inside); the extractor then runs at that size, so edges stay crisp and
thresholds mean the same at every input size. Padding is black (no signal) in the condition, except for
``inpaint``/``outpaint``, where the padded area is unknown and therefore masked.

Mask convention (``inpaint``, ``outpaint``): a mask is an "L" image, 255 = area to generate, 0 = keep. The
condition is the picture with every masked pixel set to `MASK_FILL` (mid-grey, 0.5 in the [0, 1] input of a
CSC-Tuner) — the convention of the reference implementation's inpainting annotator.

Results are deterministic for the same input and cached by (kind, parameters, image hash) in a bounded LRU.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from scedit_ui.conditions import annotators
from scedit_ui.conditions.images import (
    FIT_MODES,
    MASK_FILL,
    Box,
    Size,
    fit_image,
    inpaint_condition,
    mask_from_image,
    normalize_image,
    outpaint_condition,
    validate_size,
)
from scedit_ui.conditions.kinds import condition_kind
from tuners.validation import UserInputError

# --- requests, results and the cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionRequest:
    """What to extract: kind, generation size (width, height), fit mode and parameters.

    `params` may be given as a mapping; it is stored validated, with every default filled in, as sorted
    (name, value) pairs — so two requests that mean the same thing are equal.
    """

    kind: str
    size: Size
    fit: str = "crop"
    params: Any = ()

    def __post_init__(self) -> None:
        spec = condition_kind(self.kind)
        object.__setattr__(self, "size", validate_size(self.size))
        if self.fit not in FIT_MODES:
            raise UserInputError(f"fit must be one of {', '.join(FIT_MODES)}, not {self.fit!r}")
        given = dict(self.params.items() if isinstance(self.params, Mapping) else self.params)
        object.__setattr__(self, "params", tuple(sorted(spec.resolve(given).items())))

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    def cache_key(self, image_hash: str) -> tuple:
        """Hashable key of this request applied to the image with hash `image_hash`."""
        params = tuple((name, image_digest(v) if isinstance(v, Image.Image) else v) for name, v in self.params)
        return (self.kind, self.size, self.fit, params, image_hash)


@dataclass(frozen=True)
class Condition:
    """An extracted condition: the RGB condition image and, for inpaint/outpaint, the "L" mask (255 = generate)."""

    image: Image.Image
    mask: Image.Image | None = None


@dataclass
class ConditionCache:
    """Bounded LRU of extracted conditions. Cached images are shared: do not modify them in place."""

    maxsize: int = 32
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, key: tuple) -> Condition | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            return None

    def put(self, key: tuple, condition: Condition) -> None:
        with self._lock:
            self._entries[key] = condition
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


CONDITION_CACHE = ConditionCache()


def extract(image: Image.Image, request: ConditionRequest, *, cache: ConditionCache | None = CONDITION_CACHE) -> Condition:
    """The condition (and mask) `request` asks for, made from `image`; cached unless `cache` is None.

    Training passes `cache=None`: random augmentation parameters would only churn the cache.
    """
    image = normalize_image(image)
    if cache is None:
        return _compute(image, request)
    key = request.cache_key(image_digest(image))
    condition = cache.get(key)
    if condition is None:
        condition = _compute(image, request)
        cache.put(key, condition)
    return condition


def extract_condition(image: Image.Image, kind: str, size: Size, *, fit: str = "crop", **params: Any) -> Image.Image:
    """RGB condition image of `kind` at `size` (width, height) made from `image` (cached, see `extract`)."""
    return extract(image, ConditionRequest(kind, size, fit, params)).image


def image_digest(image: Image.Image) -> str:
    """Content hash of an image (mode, size and pixels)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()



# --- training augmentation -----------------------------------------------------------------------------------


def random_canny_thresholds(rng: np.random.Generator) -> tuple[int, int]:
    """Random (low, high) Canny thresholds: low in [50, 150], high = low + [50, 150]."""
    low = int(rng.integers(50, 151))
    return low, low + int(rng.integers(50, 151))


def random_inpaint_mask(size: Size, rng: np.random.Generator, *, max_coverage: float = 0.75) -> Image.Image:
    """LaMa-style random mask ("L", 255 = generate): 1-4 thick random-walk strokes plus 0-3 boxes.

    Sizes scale with the image; a mask covering more than `max_coverage` is drawn again (up to 100 times).
    """
    width, height = validate_size(size)
    side = min(width, height)
    for _ in range(100):
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 5))):
            stroke = max(1, int(rng.uniform(0.04, 0.15) * side))
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            angle = rng.uniform(0, 2 * math.pi)
            points = [(x, y)]
            for _ in range(int(rng.integers(1, 8))):
                angle += rng.uniform(-math.pi / 2, math.pi / 2)
                length = rng.uniform(0.1, 0.4) * side
                x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
                y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
                points.append((x, y))
            draw.line(points, fill=255, width=stroke, joint="curve")
            radius = stroke / 2
            for px, py in points:
                draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)
        for _ in range(int(rng.integers(0, 4))):
            box_w, box_h = rng.uniform(0.1, 0.4) * width, rng.uniform(0.1, 0.4) * height
            x0, y0 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
            draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill=255)
        coverage = np.count_nonzero(np.asarray(mask)) / (width * height)
        if 0 < coverage <= max_coverage:
            break
    return mask



# --- the extractors ------------------------------------------------------------------------------------------


def _canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    if low > high:
        raise UserInputError(f"canny low threshold ({low}) must not exceed the high threshold ({high})")
    # On RGB, OpenCV takes the strongest gradient over the channels: edges between equally bright colours count.
    return cv2.Canny(image, low, high)


def _color(image: np.ndarray, ratio: int) -> np.ndarray:
    height, width = image.shape[:2]
    if ratio == 0:  # scale with the size: a fixed 64 px cell left a 128 px image with 2x2 cells
        ratio = max(1, min(height, width) // 8)
    small = cv2.resize(image, (max(1, width // ratio), max(1, height // ratio)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def _line_drawing(image: np.ndarray, threshold: int, invert: str) -> np.ndarray:
    """255 where the drawing has a line, 0 elsewhere; dark-on-light drawings are inverted first."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if invert == "yes" or (invert == "auto" and np.median(gray) > 127):
        gray = 255 - gray
    return np.where(gray >= threshold, 255, 0).astype(np.uint8)


def _scribble(image: np.ndarray, threshold: int, invert: str, thickness: int) -> np.ndarray:
    lines = _line_drawing(image, threshold, invert)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thickness, thickness))
    return cv2.dilate(lines, kernel)


_MAP_EXTRACTORS: dict[str, Callable[..., np.ndarray]] = {
    "canny": _canny,
    "color": _color,
    "sketch": _line_drawing,
    "scribble": _scribble,
    "hed": annotators.detect_hed,
    "depth": annotators.detect_depth,
    "pose": annotators.detect_pose,
    "seg": annotators.detect_segmentation,
}
# Label maps must keep their exact colours when resized back to the picture's size.
_NEAREST_KINDS = {"seg", "color"}


def _compute(image: Image.Image, request: ConditionRequest) -> Condition:
    params = request.values
    width, height = request.size
    if request.kind == "outpaint":
        canvas, mask = outpaint_condition(image, request.size, fit=request.fit, **params)
        return Condition(canvas, mask)
    fitted, box = fit_image(image, request.size, request.fit)
    if request.kind == "inpaint":
        return _inpaint(image, fitted, box, request, params)

    extractor = _MAP_EXTRACTORS[request.kind]
    result = np.asarray(extractor(np.asarray(fitted), **params))
    if result.ndim == 2:
        result = np.repeat(result[:, :, None], 3, axis=2)
    if result.shape[:2] != (fitted.height, fitted.width):
        interpolation = cv2.INTER_NEAREST if request.kind in _NEAREST_KINDS else cv2.INTER_LINEAR
        result = cv2.resize(result, fitted.size, interpolation=interpolation)
    condition = Image.new("RGB", (width, height), (0, 0, 0))
    condition.paste(Image.fromarray(np.ascontiguousarray(result[:, :, :3], dtype=np.uint8), "RGB"), box[:2])
    return Condition(condition)


def _inpaint(image: Image.Image, fitted: Image.Image, box: Box, request: ConditionRequest, params: dict) -> Condition:
    full = Image.new("L", request.size, 255)  # the padding of fit="pad" is unknown: masked too
    if params["mask"] is None:
        inner = random_inpaint_mask(fitted.size, np.random.default_rng(params["seed"]))
    else:
        mask = mask_from_image(params["mask"])
        if abs(mask.width / mask.height - image.width / image.height) > 0.01:
            raise UserInputError(f"mask size {mask.size} does not have the picture's aspect ratio ({image.size})")
        inner, _ = fit_image(mask.resize(image.size, Image.Resampling.NEAREST), request.size, request.fit, resample=Image.Resampling.NEAREST)
    full.paste(inner, box[:2])
    canvas = Image.new("RGB", request.size, (MASK_FILL,) * 3)
    canvas.paste(fitted, box[:2])
    return Condition(inpaint_condition(canvas, full), full)


