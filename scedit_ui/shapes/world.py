"""The Shapes world: procedural scenes of coloured shapes on coloured backgrounds.

Every image has a caption and a scene graph (:class:`Scene`). It is the training data of the
project's tiny Stable-Diffusion-architecture model and the ground truth of the checker
(:mod:`scedit_ui.shapes.checker`), which parses captions back with :func:`checker.parse_prompt`.

Canonical caption (:func:`caption` without a random generator)::

    caption := shapes " on " article " " colour " background" [", in " style " style"]
    shapes  := shape | shape (", " shape)* " and " shape
    shape   := article " " [size " "] colour " " kind " " ("at the " position | "in the center")

``size`` is omitted for "medium". With a random generator, :func:`caption` writes the scene as people
do: positions and sizes left out now and then, "grey"/"gray", "centre"/"center", "a"/"one", "on a X
background" or ", X background", shapes in any order. A prompt that leaves a position or a size out
parses to a :class:`ShapeSpec` with ``None`` there: the checker then does not score it.

Scenes are deterministic by seed; a fixed ~12 % of the (colour, kind, background, position)
combinations is held out of the training split (:func:`is_held_out`) so held-out prompts measure
generalisation. The base model is trained on plain scenes and :data:`BASE_STYLES`; the other styles
(:data:`TUNER_STYLES`) are kept for style tuners, so a tuner has something new to teach.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from tuners.validation import UserInputError

# Chosen far apart in CIELAB so nearest-colour segmentation separates them even when blurred.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 225),
    "blue": (40, 70, 220),
    "purple": (140, 55, 190),
    "pink": (250, 135, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    # Mid grey keeps 42 CIELAB units from white and black (the closest pair, blue and purple, is 27 apart).
    "grey": (128, 128, 128),
}
# Other spellings people use, mapped to the names above (the checker reads them too).
SYNONYMS: dict[str, str] = {"gray": "grey", "centre": "center", "middle": "center"}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
SIZES: tuple[str, ...] = ("small", "medium", "large")
STYLES: tuple[str, ...] = ("stripes", "polka dots", "outline sketch", "pixelate")
BASE_STYLES: tuple[str, ...] = ("outline sketch", "pixelate")  # in the base model's training mix
TUNER_STYLES: tuple[str, ...] = tuple(s for s in STYLES if s not in BASE_STYLES)  # only for tuners

SPLITS: tuple[str, ...] = ("train", "heldout", "any")

# Geometry at 128 px; everything scales with the rendered size.
SIZE_PX: dict[str, float] = {"small": 22.0, "medium": 32.0, "large": 42.0}
CELL_CENTERS: tuple[float, float, float] = (0.19, 0.5, 0.81)  # fractions of the image side
JITTER_PX = 2.0
_MIN_GAP_PX = 3.0
HELD_OUT_FRACTION = 0.12

STRIPE_PERIOD = 16  # in units of x + y, i.e. 11.3 px perpendicular to the stripes
DOT_SPACING = 12
PIXEL_BLOCK = 8
PAPER = (245, 240, 228)
GRAPHITE = (45, 45, 55)


def _check_choice(value: str, choices, what: str) -> None:
    if value not in choices:
        raise UserInputError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}.")


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: what it is, its colour, its 3x3 grid cell and its size class.

    ``position`` or ``size`` is ``None`` only in a parsed prompt that does not name it.
    """

    kind: str
    color: str
    position: str | None
    size: str | None = "medium"

    def __post_init__(self) -> None:
        _check_choice(self.kind, SHAPES, "shape")
        _check_choice(self.color, COLORS, "colour")
        if self.position is not None:
            _check_choice(self.position, POSITIONS, "position")
        if self.size is not None:
            _check_choice(self.size, SIZES, "size")


@dataclass(frozen=True)
class Scene:
    """A scene graph: shapes (in caption order), background colour and an optional style."""

    shapes: tuple[ShapeSpec, ...]
    background: str
    style: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if not self.shapes:
            raise UserInputError("A scene needs at least one shape.")
        _check_choice(self.background, COLORS, "background colour")
        if self.style is not None:
            _check_choice(self.style, STYLES, "style")

    @property
    def renderable(self) -> bool:
        """Every shape has a position and a size (a sampled scene; a prompt may leave them out)."""
        return all(s.position is not None and s.size is not None for s in self.shapes)

    def to_dict(self) -> dict:
        return {
            "shapes": [
                {"kind": s.kind, "color": s.color, "position": s.position, "size": s.size}
                for s in self.shapes
            ],
            "background": self.background,
            "style": self.style,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        try:
            shapes = tuple(ShapeSpec(**s) for s in d["shapes"])
            return cls(shapes=shapes, background=d["background"], style=d.get("style"))
        except (KeyError, TypeError) as e:
            raise UserInputError(f"Not a Shapes-world scene dict ({e}).") from e


# ---------------------------------------------------------------------------- sampling


def is_held_out(color: str, kind: str, background: str, position: str) -> bool:
    """Whether this (colour, kind, background, position) combination is kept out of training.

    A fixed hash-based ~12 % of all combinations; every colour and every kind has some.
    """
    key = f"{color}|{kind}|{background}|{position}".encode()
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little") % 10_000 < HELD_OUT_FRACTION * 10_000


def _cell(position: str) -> tuple[int, int]:
    """(column, row) of a named grid cell."""
    i = POSITIONS.index(position)
    return i % 3, i // 3


def _fits(new: ShapeSpec, placed: list[ShapeSpec]) -> bool:
    """No two shapes' boxes (with worst-case jitter and a gap) overlap; neighbours limit sizes."""
    spacing = (CELL_CENTERS[1] - CELL_CENTERS[0]) * 128
    for s in placed:
        (c0, r0), (c1, r1) = _cell(new.position), _cell(s.position)
        if max(abs(c0 - c1), abs(r0 - r1)) > 1:
            continue
        half_sum = (SIZE_PX[new.size] + SIZE_PX[s.size]) / 2
        if half_sum + 2 * JITTER_PX + _MIN_GAP_PX > spacing:
            return False
    return True


def sample_scene(seed: int, *, split: str = "train", style: str | None = None, max_shapes: int = 3) -> Scene:
    """A random scene, deterministic by ``seed``.

    1..``max_shapes`` shapes in distinct cells, none overlapping, background colour different from
    every shape colour. ``split="train"`` never yields a held-out combination, ``"heldout"`` yields
    only held-out ones, ``"any"`` does not filter.
    """
    _check_choice(split, SPLITS, "split")
    if style is not None:
        _check_choice(style, STYLES, "style")
    if max_shapes < 1 or max_shapes > len(POSITIONS):
        raise UserInputError(f"max_shapes must be between 1 and {len(POSITIONS)}, got {max_shapes}.")
    rng = random.Random(f"shapes-world:{split}:{seed}")
    colors = list(COLORS)
    background = rng.choice(colors)
    n = rng.randint(1, max_shapes)
    shapes: list[ShapeSpec] = []
    free = list(POSITIONS)
    for _ in range(n):
        for _attempt in range(200):
            spec = ShapeSpec(
                kind=rng.choice(SHAPES),
                color=rng.choice([c for c in colors if c != background]),
                position=rng.choice(free),
                size=rng.choice(SIZES),
            )
            held = is_held_out(spec.color, spec.kind, background, spec.position)
            if (split == "train" and held) or (split == "heldout" and not held):
                continue
            if _fits(spec, shapes):
                shapes.append(spec)
                free.remove(spec.position)
                break
    if not shapes:  # every attempt rejected: only possible for pathological seeds; try the next one
        return sample_scene(seed + 1_000_003, split=split, style=style, max_shapes=max_shapes)
    return Scene(shapes=tuple(shapes), background=background, style=style)


# ---------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position_phrase(position: str) -> str:
    """How a canonical caption names a position: "in the center", "at the top left"."""
    return "in the center" if position == "center" else f"at the {position}"


def _shape_phrase(s: ShapeSpec) -> str:
    words = ([s.size] if s.size not in ("medium", None) else []) + [s.color, s.kind]
    text = f"{_article(words[0])} {' '.join(words)}"
    return text if s.position is None else f"{text} {position_phrase(s.position)}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# How often a free-form caption (caption with a generator) names what it may leave out.
P_NAME_POSITION = 0.7  # per shape
P_NAME_SIZE = 0.7  # per small or large shape ("medium" is never named)
P_ONE = 0.15  # "one" instead of "a"/"an"
P_SHORT_BACKGROUND = 0.35  # ", X background" or "on X background" instead of "on a X background"


def _free_shape_phrase(s: ShapeSpec, rng: random.Random) -> str:
    def spell(word: str) -> str:
        if word == "grey":
            return rng.choice(("grey", "gray"))
        return word

    words = [spell(s.color), s.kind]
    if s.size not in ("medium", None) and rng.random() < P_NAME_SIZE:
        words.insert(0, s.size)
    article = "one" if rng.random() < P_ONE else _article(words[0])
    text = f"{article} {' '.join(words)}"
    if s.position is None or rng.random() >= P_NAME_POSITION:
        return text
    if s.position == "center":
        return f"{text} {rng.choice(('in the center', 'in the centre', 'in the middle', 'at the center'))}"
    return f"{text} {rng.choice(('at the', 'in the'))} {s.position}"


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene as one sentence.

    Without ``rng`` the canonical form, e.g. "a red circle at the top left and a small blue star in the
    center on a yellow background" (", in stripes style" appended for styled scenes). With ``rng`` a
    free form as people write it (see the module docstring), deterministic by the generator's state.
    """
    if rng is None:
        text = _join([_shape_phrase(s) for s in scene.shapes])
        text += f" on {_article(scene.background)} {scene.background} background"
    else:
        shapes = list(scene.shapes)
        rng.shuffle(shapes)
        text = _join([_free_shape_phrase(s, rng) for s in shapes])
        background = scene.background if scene.background != "grey" else rng.choice(("grey", "gray"))
        if rng.random() < P_SHORT_BACKGROUND:
            text += rng.choice((f", {background} background", f" on {background} background"))
        else:
            text += f" on {_article(background)} {background} background"
    if scene.style is not None:
        text += f", in {scene.style} style"
    return text


def plain_prompt(scene: Scene) -> str:
    """The one-shape prompt a new user writes first: "a red circle on a white background" (no position, no size)."""
    plain = Scene(tuple(ShapeSpec(s.kind, s.color, None, None) for s in scene.shapes), scene.background, scene.style)
    return caption(plain)


# ---------------------------------------------------------------------------- rendering

_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


def _star_points(cx: float, cy: float, d: float) -> np.ndarray:
    outer, inner = d / 2, d / 2 * 0.45
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    pts = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    pts -= (pts.min(0) + pts.max(0)) / 2  # centre the bounding box
    return pts + (cx, cy)


def shape_polygon(kind: str, cx: float, cy: float, d: float) -> np.ndarray | None:
    """Outline of a polygonal kind centred (by bounding box) at (cx, cy); None for round kinds."""
    if kind == "square":
        h = 0.85 * d / 2
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if kind == "triangle":
        h = d * np.sqrt(3) / 2
        return np.array([[cx, cy - h / 2], [cx + d / 2, cy + h / 2], [cx - d / 2, cy + h / 2]])
    if kind == "star":
        return _star_points(cx, cy, d)
    return None


RING_INNER = 0.5  # inner / outer radius


def shape_alpha(kind: str, cx: float, cy: float, d: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage (uint8, 0..255) of one shape of nominal size ``d`` px on an image."""
    alpha = np.zeros((height, width), np.uint8)
    center = (round(cx * _ONE), round(cy * _ONE))
    if kind in ("circle", "ring"):
        cv2.circle(alpha, center, round(d / 2 * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        if kind == "ring":
            cv2.circle(alpha, center, round(d / 2 * RING_INNER * _ONE), 0, -1, cv2.LINE_AA, _SHIFT)
    else:
        pts = shape_polygon(kind, cx, cy, d)
        cv2.fillPoly(alpha, [np.round(pts * _ONE).astype(np.int32)], 255, cv2.LINE_AA, _SHIFT)
    return alpha


def draw_shape(canvas: np.ndarray, kind: str, cx: float, cy: float, d: float, color) -> None:
    """Blend one filled, anti-aliased shape of nominal size ``d`` px into an HxWx3 or HxW array."""
    height, width = canvas.shape[:2]
    x0, y0 = max(0, int(cx - d / 2) - 2), max(0, int(cy - d / 2) - 2)
    x1, y1 = min(width, int(cx + d / 2) + 3), min(height, int(cy + d / 2) + 3)
    alpha = shape_alpha(kind, cx - x0, cy - y0, d, y1 - y0, x1 - x0).astype(np.float32) / 255
    region = canvas[y0:y1, x0:x1]
    if region.ndim == 3:
        alpha = alpha[..., None]
    blended = region * (1 - alpha) + np.asarray(color, np.float32) * alpha
    canvas[y0:y1, x0:x1] = np.round(blended).astype(canvas.dtype)


def shape_geometry(scene: Scene, size: int = 128) -> list[tuple[float, float, float]]:
    """(cx, cy, d) in pixels of each shape of ``scene`` as :func:`render_scene` draws it.

    Centres are grid-cell centres plus a small jitter derived from the scene's shapes and
    background, so a scene always renders the same way.
    """
    scale = size / 128
    # The style is left out so that a styled scene is exactly the styled plain render.
    layout = json.dumps({**scene.to_dict(), "style": None}, sort_keys=True)
    rng = random.Random(zlib.crc32(layout.encode()))
    out = []
    for s in scene.shapes:
        col, row = _cell(s.position)
        d = SIZE_PX[s.size] * scale
        jx, jy = (rng.uniform(-JITTER_PX, JITTER_PX) * scale for _ in range(2))
        cx = min(max(CELL_CENTERS[col] * size + jx, d / 2 + scale), size - d / 2 - scale)
        cy = min(max(CELL_CENTERS[row] * size + jy, d / 2 + scale), size - d / 2 - scale)
        out.append((cx, cy, d))
    return out


def render_scene(scene: Scene, size: int = 128) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` x ``size`` px (deterministic)."""
    if not scene.renderable:
        raise UserInputError("Cannot render a scene that leaves a shape's position or size open; name both.")
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = COLORS[scene.background]
    for spec, (cx, cy, d) in zip(scene.shapes, shape_geometry(scene, size)):
        draw_shape(canvas, spec.kind, cx, cy, d, COLORS[spec.color])
    image = Image.fromarray(canvas)
    return apply_style(image, scene.style) if scene.style is not None else image


# ---------------------------------------------------------------------------- styles


def _stripes(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    band = ((xx + yy) % STRIPE_PERIOD) < STRIPE_PERIOD // 2
    out = a.astype(np.float32)
    # Light bands on dark pixels and dark bands on light ones keep the stripes visible everywhere.
    target = np.where(out.mean(2, keepdims=True) > 140, 0.0, 255.0)
    out[band] = out[band] * 0.55 + target[band] * 0.45
    return out.astype(np.uint8)


def _polka_dots(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    r = DOT_SPACING * 0.22
    for y in range(DOT_SPACING // 2, h, DOT_SPACING):
        for x in range(DOT_SPACING // 2, w, DOT_SPACING):
            cv2.circle(mask, (x * _ONE, y * _ONE), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
    alpha = (mask.astype(np.float32) / 255 * 0.6)[..., None]
    out = a.astype(np.float32)
    target = np.where(out.mean(2, keepdims=True) > 140, 0.0, 255.0)
    return (out * (1 - alpha) + target * alpha).astype(np.uint8)


def _outline_sketch(a: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    # Colour edges: any channel changing counts, so equal-luminance colours still get a line.
    edges = np.zeros(gray.shape, np.uint8)
    for ch in range(3):
        edges |= cv2.Canny(a[..., ch], 40, 100)
    edges = cv2.dilate(edges, np.ones((2, 2), np.uint8))
    edges = cv2.GaussianBlur(edges, (3, 3), 0).astype(np.float32)[..., None] / 255
    paper = np.array(PAPER, np.float32)
    line = np.array(GRAPHITE, np.float32)
    out = paper * (1 - edges) + line * edges
    return out.clip(0, 255).astype(np.uint8)


def _pixelate(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // PIXEL_BLOCK), max(1, h // PIXEL_BLOCK)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


_STYLE_FUNCS = {
    "stripes": _stripes,
    "polka dots": _polka_dots,
    "outline sketch": _outline_sketch,
    "pixelate": _pixelate,
}


def apply_style(image: Image.Image, style: str) -> Image.Image:
    """Apply one of :data:`STYLES` to any RGB image (render_scene uses it for styled scenes)."""
    _check_choice(style, STYLES, "style")
    a = np.asarray(image.convert("RGB"))
    return Image.fromarray(_STYLE_FUNCS[style](a))


# ---------------------------------------------------------------------------- datasets


def make_dataset(
    n: int, seed: int, *, split: str = "train", style: str | None = None, size: int = 128
) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Yield ``n`` (image, caption, scene) triples.

    Scene seeds are drawn from ``random.Random(seed)``, so datasets with different seeds are
    independent and a longer dataset extends a shorter one with the same seed.
    """
    seeds = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(seeds.getrandbits(48), split=split, style=style)
        yield render_scene(scene, size), caption(scene), scene
