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
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from scedit_ui import annotators
from scedit_ui.errors import UserInputError

DEFAULT_MAX_PIXELS = 40_000_000  # refuse bigger pictures before decoding them (decompression bombs)
MAX_SIDE = 8192
MASK_FILL = 128  # every channel of a masked pixel in inpaint/outpaint conditions
FIT_MODES = ("crop", "resize", "pad")

Size = tuple[int, int]  # (width, height)
Box = tuple[int, int, int, int]  # (left, top, right, bottom)


# --- parameters and kinds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a condition kind; the UI builds a control from it, the CLI parses text with it.

    `type` is "int", "float", "bool", "choice" (one of `choices`) or "mask" (an image or None).
    """

    name: str
    type: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def validate(self, value: Any) -> Any:
        """`value` converted to this parameter's type, or `UserInputError`."""
        if self.type == "mask":
            if value is not None and not isinstance(value, Image.Image):
                raise UserInputError(f"{self.name} must be an image, not {type(value).__name__}")
            return value
        if self.type == "bool":
            if isinstance(value, str):
                return self.parse(value)
            if not isinstance(value, (bool, np.bool_, int)) or value not in (0, 1):
                raise UserInputError(f"{self.name} must be true or false, not {value!r}")
            return bool(value)
        if self.type == "choice":
            if value not in self.choices:
                raise UserInputError(f"{self.name} must be one of {', '.join(self.choices)}, not {value!r}")
            return value
        number_type = int if self.type == "int" else float
        try:
            number = number_type(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{self.name} must be a number ({self.type}), not {value!r}") from None
        if number_type is int and number != float(value):
            raise UserInputError(f"{self.name} must be a whole number, not {value!r}")
        if not math.isfinite(number) or (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            raise UserInputError(f"{self.name} must be between {self.minimum} and {self.maximum}, not {value!r}")
        return number

    def parse(self, text: str) -> Any:
        """`text` (from the command line) converted to this parameter's type."""
        if self.type == "bool":
            lowered = text.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise UserInputError(f"{self.name} must be true or false, not {text!r}")
        if self.type == "mask":
            raise UserInputError(f"{self.name} is an image; pass it with --mask FILE")
        return self.validate(text)


@dataclass(frozen=True)
class ConditionKind:
    """A condition type: its parameters with defaults, and the annotator models it needs (if any)."""

    name: str
    description: str
    params: tuple[ParamSpec, ...] = ()
    annotator_models: tuple[str, ...] = ()
    makes_mask: bool = False

    def param(self, name: str) -> ParamSpec:
        """The parameter called `name`, or `UserInputError` listing the accepted ones."""
        for spec in self.params:
            if spec.name == name:
                return spec
        accepted = ", ".join(p.name for p in self.params) or "no parameters"
        raise UserInputError(f"{self.name} has no parameter {name!r} (it takes: {accepted})")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value: `params` validated, the others at their defaults."""
        for name in sorted(params):
            self.param(name)
        specs = {p.name: p for p in self.params}
        return {name: spec.validate(params[name]) if name in params else spec.default for name, spec in specs.items()}


def _detect_resolution() -> ParamSpec:
    return ParamSpec("detect_resolution", "int", 512, "short side the annotator network sees", 64, 2048)


CONDITION_KINDS: Mapping[str, ConditionKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            ConditionKind(
                "canny",
                "Canny edges: white edges on black",
                (
                    ParamSpec("low", "int", 100, "lower hysteresis threshold", 0, 1000),
                    ParamSpec("high", "int", 200, "upper hysteresis threshold", 0, 1000),
                ),
            ),
            ConditionKind(
                "color",
                "colour map: mean colour of each ratio x ratio cell, up-sampled back to size",
                (ParamSpec("ratio", "int", 64, "down-sampling factor", 1, 512),),
            ),
            ConditionKind(
                "inpaint",
                f"picture with the masked area set to grey {MASK_FILL} (mask white = area to generate)",
                (
                    ParamSpec("mask", "mask", None, "area to generate (white or opaque); none: random LaMa-style mask"),
                    ParamSpec("seed", "int", 0, "seed of the random mask when no mask is given", 0, 2**31 - 1),
                ),
                makes_mask=True,
            ),
            ConditionKind(
                "outpaint",
                f"picture shrunk into a bigger canvas; the new border is grey {MASK_FILL} and masked",
                tuple(
                    ParamSpec(side, "float", 0.125, f"new area at the {side}, fraction of the generation size", 0.0, 0.9)
                    for side in ("left", "top", "right", "bottom")
                ),
                makes_mask=True,
            ),
            ConditionKind(
                "sketch",
                "line drawing made edge-like: white lines on black (inverted if drawn dark on light)",
                (
                    ParamSpec("threshold", "int", 128, "a pixel is a line when its ink is at least this", 1, 255),
                    ParamSpec("invert", "choice", "auto", "lines are dark on light paper", choices=("auto", "yes", "no")),
                ),
            ),
            ConditionKind(
                "scribble",
                "scribble from a drawing: its lines thickened into white strokes on black",
                (
                    ParamSpec("threshold", "int", 128, "a pixel is a line when its ink is at least this", 1, 255),
                    ParamSpec("invert", "choice", "auto", "lines are dark on light paper", choices=("auto", "yes", "no")),
                    ParamSpec("thickness", "int", 5, "stroke width in pixels", 1, 64),
                ),
            ),
            ConditionKind(
                "hed",
                "HED soft edges (controlnet-aux)",
                (
                    _detect_resolution(),
                    ParamSpec("safe", "bool", False, "quantise edges (ControlNet's 'safe' mode)"),
                    ParamSpec("scribble", "bool", False, "thin and binarise into a scribble"),
                ),
                annotator_models=("hed",),
            ),
            ConditionKind(
                "depth",
                "MiDaS DPT-hybrid depth, near = bright (controlnet-aux)",
                (_detect_resolution(),),
                annotator_models=("midas",),
            ),
            ConditionKind(
                "pose",
                "OpenPose skeletons on black (controlnet-aux)",
                (
                    _detect_resolution(),
                    ParamSpec("include_hand", "bool", False, "also draw hands (needs hand_pose_model.pth)"),
                    ParamSpec("include_face", "bool", False, "also draw faces (needs facenet.pth)"),
                ),
                annotator_models=("openpose_body",),
            ),
            ConditionKind(
                "seg",
                "ADE20K semantic segmentation in ControlNet's palette (transformers)",
                (
                    _detect_resolution(),
                    ParamSpec(
                        "model",
                        "choice",
                        annotators.SEGMENTATION_MODELS[0],
                        "segmentation network",
                        choices=annotators.SEGMENTATION_MODELS,
                    ),
                ),
                annotator_models=annotators.SEGMENTATION_MODELS[:1],
            ),
        )
    }
)


def condition_kind(name: str) -> ConditionKind:
    """The `ConditionKind` called `name`, or `UserInputError` listing the known kinds."""
    try:
        return CONDITION_KINDS[name]
    except KeyError:
        raise UserInputError(f"unknown condition kind {name!r}; choose one of {', '.join(CONDITION_KINDS)}") from None


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
        object.__setattr__(self, "size", _validate_size(self.size))
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
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, key: tuple) -> Condition | None:
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
            self.misses += 1
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


def _validate_size(size: Any) -> Size:
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise UserInputError(f"size must be (width, height), not {size!r}") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise UserInputError(f"size {width}x{height} is out of range: each side must be 1 to {MAX_SIDE} pixels")
    return width, height


# --- geometry ------------------------------------------------------------------------------------------------


def fit_image(image: Image.Image, size: Size, fit: str = "crop", *, resample: int = Image.Resampling.BICUBIC) -> tuple[Image.Image, Box]:
    """`image` brought to `size`: the resized image and the box it fills in a `size` canvas.

    "crop" scales to cover and centre-crops, "resize" stretches (both fill the whole box); "pad" scales to fit
    inside and centres, leaving the rest of the canvas to the caller.
    """
    width, height = size
    if fit == "resize":
        return image.resize(size, resample), (0, 0, width, height)
    if fit == "crop":
        return ImageOps.fit(image, size, resample), (0, 0, width, height)
    if fit == "pad":
        scale = min(width / image.width, height / image.height)
        inner = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
        left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
        return image.resize(inner, resample), (left, top, left + inner[0], top + inner[1])
    raise UserInputError(f"fit must be one of {', '.join(FIT_MODES)}, not {fit!r}")


def inpaint_condition(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked-image condition: `image` with every pixel where `mask` is 255 set to grey `MASK_FILL`."""
    if image.size != mask.size:
        raise UserInputError(f"mask size {mask.size} differs from image size {image.size}")
    filled = Image.new("RGB", image.size, (MASK_FILL,) * 3)
    return Image.composite(filled, image.convert("RGB"), mask_from_image(mask))


def outpaint_condition(
    image: Image.Image, size: Size, *, left: float, top: float, right: float, bottom: float, fit: str = "crop"
) -> tuple[Image.Image, Image.Image]:
    """Extended canvas and mask: `image` fitted into `size` minus the borders (fractions of `size`).

    The canvas is grey `MASK_FILL` outside the picture; the mask is 255 there (the area to generate), 0 on it.
    """
    width, height = _validate_size(size)
    if left + right >= 1 or top + bottom >= 1:
        raise UserInputError(f"outpaint borders leave no room for the picture (left+right={left + right:g}, top+bottom={top + bottom:g}; each must stay below 1)")
    box = (round(left * width), round(top * height), width - round(right * width), height - round(bottom * height))
    inner_size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    fitted, inner_box = fit_image(image, inner_size, fit)
    canvas = Image.new("RGB", size, (MASK_FILL,) * 3)
    mask = Image.new("L", size, 255)
    offset = (box[0] + inner_box[0], box[1] + inner_box[1])
    canvas.paste(fitted, offset)
    mask.paste(0, (*offset, offset[0] + fitted.width, offset[1] + fitted.height))
    return canvas, mask


def mask_from_image(mask: Image.Image) -> Image.Image:
    """A drawn mask as an "L" image of 0/255: its alpha if it has transparency, else its brightness (> 127)."""
    gray = None
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            gray = alpha
    if gray is None:
        gray = mask.convert("L") if mask.mode in ("L", "1") else normalize_image(mask).convert("L")
    return gray.point(lambda v: 255 if v > 127 else 0)


# --- training augmentation -----------------------------------------------------------------------------------


def random_canny_thresholds(rng: np.random.Generator) -> tuple[int, int]:
    """Random (low, high) Canny thresholds: low in [50, 150], high = low + [50, 150]."""
    low = int(rng.integers(50, 151))
    return low, low + int(rng.integers(50, 151))


def random_inpaint_mask(size: Size, rng: np.random.Generator, *, max_coverage: float = 0.75) -> Image.Image:
    """LaMa-style random mask ("L", 255 = generate): 1-4 thick random-walk strokes plus 0-3 boxes.

    Sizes scale with the image; a mask covering more than `max_coverage` is drawn again (up to 100 times).
    """
    width, height = _validate_size(size)
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


# --- reading pictures ---------------------------------------------------------------------------------------


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Read a picture as RGB (see `normalize_image`), refusing non-images and pictures over `max_pixels`.

    `name` is how messages call the file (default: its path; a server passes the uploaded file's name).
    """
    return normalize_image(_open(source, max_pixels, name), max_pixels=max_pixels)


def load_mask(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a mask as "L" 0/255 (see `mask_from_image`): white or opaque = area to generate."""
    return mask_from_image(_open(source, max_pixels))


def normalize_image(image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`image` as 8-bit RGB, upright per its EXIF orientation.

    Transparency is composited over white; 16-bit and float images are scaled to 8 bits.
    """
    _check_pixels(image.size, max_pixels, "the picture")
    if image.mode == "RGB" and not image.getexif().get(0x0112):
        return image
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UserInputError(f"cannot convert a picture of mode {image.mode} to RGB: {error}") from None


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write `image` to `path` (format from the extension), with a clear error when that fails."""
    path = Path(path)
    try:
        image.save(path)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot write {path}: {error}") from None
    return path


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    values = array.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
    elif mode.startswith("I;16") or values.max(initial=0) > 255:
        scale = 255.0 / max(65535.0, values.max(initial=0))  # 16-bit data
    else:
        scale = 1.0
    return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)


def _check_pixels(size: Size, max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise UserInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f}; shrink it first"
        )
    if width < 1 or height < 1:
        raise UserInputError(f"{name} is empty ({width}x{height})")


def _open(source: str | Path | bytes, max_pixels: int, name: str | None = None) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        name, stream = name or "the uploaded data", io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        name, stream = name or str(source), Path(source)
        if len(name) > 200:  # a name too long for the file system would fill the screen
            name = f"{name[:200]}…"
        try:
            if not stream.is_file():
                raise UserInputError(f"{name}: no such file")
        except OSError as error:
            raise UserInputError(f"{name}: cannot be opened ({error.strerror})") from None
    else:
        raise UserInputError(f"expected a file path or image bytes, not {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own limit, checked below before decoding, replaces Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError:
        raise UserInputError(f"{name} is too large to open safely; shrink it below {max_pixels / 1e6:.0f} megapixels first") from None
    except UnidentifiedImageError:
        raise UserInputError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from None
    except OSError as error:
        raise UserInputError(f"cannot read {name}: {error}") from None
    _check_pixels(image.size, max_pixels, name)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise UserInputError(f"{name} is truncated or corrupt: {error}") from None
    return image


# --- command line ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> Size:
    """'512x384' -> (512, 384); '512' -> (512, 512)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise UserInputError(f"size must look like WIDTHxHEIGHT (e.g. 512x512), not {text!r}") from None
    if len(numbers) not in (1, 2):
        raise UserInputError(f"size must look like WIDTHxHEIGHT (e.g. 512x512), not {text!r}")
    return _validate_size(numbers * 2 if len(numbers) == 1 else numbers)


def parse_params(kind: str, assignments: Iterable[str]) -> dict[str, Any]:
    """['low=50', 'high=150'] -> {'low': 50, 'high': 150}, typed and checked against `kind`'s parameters."""
    spec = condition_kind(kind)
    params: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep:
            raise UserInputError(f"parameter must look like NAME=VALUE, not {assignment!r}")
        name = name.strip().replace("-", "_")
        params[name] = spec.param(name).parse(text)
    return params


def describe_kinds() -> str:
    """One line per kind with its parameters and defaults (for --help)."""
    lines = []
    for kind in CONDITION_KINDS.values():
        params = ", ".join(f"{p.name}={p.default}" for p in kind.params if p.type != "mask")
        weights = "  [needs weights]" if kind.annotator_models else ""
        lines.append(f"  {kind.name:9} {kind.description}{weights}" + (f"\n            params: {params}" if params else ""))
    return "\n".join(lines)
