"""Automatic checker for the Shapes world: reads an image back with classical computer vision.

No learned model: colour segmentation (opencv + numpy), contours and template matching. It is
tolerant of the blur and noise of generated images (median filtering, nearest named colour in
CIELAB, morphological opening, small blobs ignored).

Metrics (:func:`score_adherence`, against a :class:`~scedit_ui.shapes.world.Scene` or a caption):

- **background_correct** — the named colour nearest (CIELAB) to the majority of the border
  pixels equals the prompted background colour.
- Blobs — connected regions that differ from the measured background by more than half the
  smallest CIELAB distance between two named colours (3x3 median first, 3x3 opening after);
  regions under 0.35 % of the image (57 px at 128 px) are ignored. A region's colours are the
  named colours of its core (eroded twice), minus any that is a blend of the background and
  another of its colours (a blurred rim); its pixels go to the nearest of the background and
  those colours, so a blurred edge falls at mid-colour and touching shapes are split. Each blob
  gets that named colour, a kind (the upright template — circle, square, triangle, star, ring —
  with the highest IoU against the blob, fitted to its bounding box) and a 3x3 grid cell (from
  its bounding-box centre, cells split at thirds of the image).
- Prompted shapes are matched one-to-one to blobs of the *same colour*, maximising
  4 + 2·[kind right] + [cell right] over the matching (exact, by dynamic programming).
- **color_correct** — fraction of prompted shapes matched to a blob of their colour.
- **shape_correct** — fraction of prompted shapes whose matched blob (same colour) has the
  prompted kind.
- **position_correct** — fraction of the prompted shapes *with a position* whose matched blob (same
  colour) lies in the prompted grid cell; ``None`` when the prompt names no position.
- **count_correct** — the number of blobs equals the number of prompted shapes.
- **cells_correct** — per prompted shape, in the prompt's order: whether its matched blob lies in its cell
  (``None`` for a shape without a position); how well the first, second, ... clause is placed.
- **extra_blobs** — blobs found minus shapes prompted (negative when shapes are missing).
- The blobs left unmatched, by what they are: **fragments** (touching a matched blob's bounding box or inside it,
  in any colour: a shape drawn in pieces, a fringe, a ring's hole filled with another colour), and elsewhere
  **copies** (a prompted colour: a shape drawn twice) and **strays** (a colour the prompt does not name).
- **overall** — mean of the five (booleans as 0/1; of four when position is ``None``).

:func:`style_score` in [0, 1] measures one style without reference to the prompt:

- *stripes* — after removing low frequencies (image minus a sigma-6 blur), the normalised
  autocorrelation c is high along a diagonal (min of c at shifts (3, ±3), (5, ±5)) and alternates
  across it ((c(p, 0) - c(p/2, 0)) / 2, best period p in 12..20 px); score = the smaller of the two.
- *polka dots* — after removing low frequencies (sigma 4), min(c(s, 0), c(0, s)) minus the largest
  of c(s/2, 0), c(0, s/2), c(s/2, -s/2): high for a dot lattice of spacing s, best s in 9..16 px.
- *outline sketch* — the fraction of light, unsaturated "paper" pixels, times the thinness of the
  rest (the share of non-paper pixels removed by a 5x5 erosion), times the share of the rest that
  is unsaturated (graphite rather than paint).
- *pixelate* — horizontal and vertical squared colour differences (after a 5x5 median) folded
  modulo the 8-px block; r = |first harmonic| / mean of that 8-bin profile is 1 when all edges
  lie on one block phase and near 0 when they are spread evenly; score = clip((r - 0.2) / 0.6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from scedit_ui.shapes.world import (
    COLORS,
    PIXEL_BLOCK,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    SYNONYMS,
    Scene,
    ShapeSpec,
    shape_alpha,
    shape_polygon,
)
from tuners.validation import UserInputError

_NAMES = list(COLORS)
_PALETTE_LAB = cv2.cvtColor(np.array([[COLORS[n] for n in _NAMES]], np.float32) / 255, cv2.COLOR_RGB2LAB)[0]
_MIN_PALETTE_DIST = min(
    float(np.linalg.norm(_PALETTE_LAB[i] - _PALETTE_LAB[j]))
    for i in range(len(_NAMES)) for j in range(i + 1, len(_NAMES))
)
MIN_BLOB_FRACTION = 0.0035
_MAX_BLOBS = 24


@dataclass
class DetectedShape:
    """One blob found in an image. ``bbox`` is (x, y, width, height) in pixels."""

    kind: str
    color: str
    position: str
    area: float
    bbox: tuple[int, int, int, int]


@dataclass
class Adherence:
    """How well an image follows its prompt; see the module docstring for the definitions."""

    color_correct: float
    shape_correct: float
    count_correct: bool
    background_correct: bool
    position_correct: float | None  # None when the prompt names no position
    cells_correct: tuple[bool | None, ...] = ()
    extra_blobs: int = 0
    fragments: int = 0
    copies: int = 0
    strays: int = 0

    @property
    def overall(self) -> float:
        five = (self.color_correct, self.shape_correct, self.count_correct, self.background_correct, self.position_correct)
        return float(np.mean([float(v) for v in five if v is not None]))


# ---------------------------------------------------------------------------- segmentation


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise UserInputError(f"Expected an RGB image, got an array of shape {a.shape}.")
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8) if a.max() <= 1.0 else a.clip(0, 255).astype(np.uint8)
    return a


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)


def _nearest_color_index(lab: np.ndarray, exclude: int | None = None) -> np.ndarray:
    d = np.linalg.norm(lab[..., None, :] - _PALETTE_LAB, axis=-1)
    if exclude is not None:
        d[..., exclude] = np.inf
    return d.argmin(-1)


def _border(a: np.ndarray, width: int = 3) -> np.ndarray:
    return np.concatenate([
        a[:width].reshape(-1, a.shape[-1]), a[-width:].reshape(-1, a.shape[-1]),
        a[:, :width].reshape(-1, a.shape[-1]), a[:, -width:].reshape(-1, a.shape[-1]),
    ])


def _background(lab: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the background's named colour and its measured Lab value."""
    border = _border(lab)
    labels = _nearest_color_index(border)
    index = int(np.bincount(labels, minlength=len(_NAMES)).argmax())
    return index, np.median(border[labels == index], axis=0)


def detect_background(image) -> str:
    """Named colour of the background: majority of the nearest colours of the border pixels."""
    rgb = cv2.medianBlur(_as_rgb(image), 3)
    return _NAMES[_background(_to_lab(rgb))[0]]


def _template_factors() -> dict[str, tuple[float, float]]:
    """Bounding-box width and height of each kind per unit of nominal size."""
    out = {}
    for kind in SHAPES:
        pts = shape_polygon(kind, 0.0, 0.0, 1.0)
        out[kind] = (1.0, 1.0) if pts is None else tuple(float(v) for v in np.ptp(pts, axis=0))
    return out


_FACTORS = _template_factors()


def _classify(mask: np.ndarray) -> str:
    """Kind whose upright template, fitted to the blob's bounding box, overlaps it best (IoU)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    pad = 3
    crop = mask[max(0, y0 - pad): y1 + pad + 1, max(0, x0 - pad): x1 + pad + 1] > 0
    cx, cy = x0 - max(0, x0 - pad) + (w - 1) / 2, y0 - max(0, y0 - pad) + (h - 1) / 2
    best, best_iou = SHAPES[0], -1.0
    for kind in SHAPES:
        fw, fh = _FACTORS[kind]
        d = ((w - 1) / fw + (h - 1) / fh) / 2  # cv2 covers pixel centres at both ends: w - 1 wide
        t = shape_alpha(kind, cx, cy, d, *crop.shape) >= 128
        iou = (t & crop).sum() / max(1, (t | crop).sum())
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


def _position(cx: float, cy: float, width: int, height: int) -> str:
    col = min(2, int(3 * cx / width))
    row = min(2, int(3 * cy / height))
    return POSITIONS[row * 3 + col]


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-6), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


_MIX_TOLERANCE = 25.0  # RGB units: a colour this close to a blend of two others is a blurred edge


def _component_blobs(
    rgb: np.ndarray, lab: np.ndarray, component: np.ndarray, bg_index: int, bg_lab: np.ndarray, min_area: float
) -> list[tuple[np.ndarray, int]]:
    """Split one foreground region into single-colour blobs with edges at mid-colour.

    The region's colours are read from its core (eroded twice); a minor colour that is a blend of
    the background and a major colour (in RGB, where blur mixes linearly) is a blurred rim and is
    dropped. Each pixel then goes to the nearest of the background and the remaining colours, which
    puts the edge of a blurred shape where it was before blurring.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    core = cv2.erode(component.astype(np.uint8), kernel, iterations=2).astype(bool)
    if core.sum() < min_area / 4:
        core = component
    core_labels = _nearest_color_index(lab[core], exclude=bg_index)
    counts = np.bincount(core_labels, minlength=len(_NAMES))
    candidates = [int(c) for c in np.argsort(-counts) if counts[c] >= max(min_area / 4, 0.05 * len(core_labels))]
    core_rgb = rgb[core].astype(np.float32)
    bg_rgb = np.median(rgb[~component].reshape(-1, 3), axis=0).astype(np.float32) if (~component).any() \
        else np.array(COLORS[_NAMES[bg_index]], np.float32)
    colors, rgb_centers = [], [bg_rgb]
    for c in candidates:
        center = np.median(core_rgb[core_labels == c], axis=0)
        is_blend = any(
            _segment_distance(center, rgb_centers[i], rgb_centers[j]) < _MIX_TOLERANCE
            for i in range(len(rgb_centers)) for j in range(i + 1, len(rgb_centers))
        )
        if not is_blend:
            colors.append(c)
            rgb_centers.append(center)
    lab_centers = np.stack([bg_lab] + [np.median(lab[core][core_labels == c], axis=0) for c in colors])
    region = cv2.dilate(component.astype(np.uint8), kernel, iterations=2).astype(bool)
    owner = np.linalg.norm(lab[..., None, :] - lab_centers, axis=-1).argmin(-1)
    blobs = []
    for k, c in enumerate(colors, start=1):
        part = cv2.morphologyEx((region & (owner == k)).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        n, sub, stats, _ = cv2.connectedComponentsWithStats(part, connectivity=8)
        blobs.extend((sub == j, c) for j in range(1, n) if stats[j, cv2.CC_STAT_AREA] >= min_area)
    return blobs


def detect_shapes(image) -> list[DetectedShape]:
    """All shape-sized blobs that differ from the background, largest first."""
    rgb = cv2.medianBlur(_as_rgb(image), 3)
    lab = _to_lab(rgb)
    height, width = lab.shape[:2]
    min_area = MIN_BLOB_FRACTION * height * width
    bg_index, bg_lab = _background(lab)
    foreground = (np.linalg.norm(lab - bg_lab, axis=-1) > _MIN_PALETTE_DIST / 2).astype(np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))

    shapes = []
    n, components, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, w, h = stats[i, :4]
        pad = 4  # work on a crop around the region, with room for the dilation
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(width, x + w + pad), min(height, y + h + pad)
        crop = components[y0:y1, x0:x1] == i
        for mask, color in _component_blobs(rgb[y0:y1, x0:x1], lab[y0:y1, x0:x1], crop, bg_index, bg_lab, min_area):
            ys, xs = np.nonzero(mask)
            bbox = (int(xs.min() + x0), int(ys.min() + y0), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1))
            shapes.append(DetectedShape(
                kind=_classify(mask),
                color=_NAMES[color],
                position=_position(bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2, width, height),
                area=float(len(xs)),
                bbox=bbox,
            ))
    shapes.sort(key=lambda s: -s.area)
    return shapes[:_MAX_BLOBS]


# ---------------------------------------------------------------------------- prompts

_POSITION_WORDS = "|".join(sorted((re.escape(p) for p in POSITIONS), key=len, reverse=True))
_COLOR_WORDS = "|".join(COLORS)
_SHAPE_RE = re.compile(
    rf"^(?:an?|one) (?:(?P<size>{'|'.join(SIZES)}) )?(?P<color>[a-z]+) (?P<kind>[a-z]+)"
    rf"(?: (?:(?:at|in|on) )?(?:the )?(?P<position>{_POSITION_WORDS}))?$"
)
_SCENE_RE = re.compile(
    rf"^(?P<shapes>.+?)(?: on (?:an? )?|, )(?P<background>{_COLOR_WORDS}) background"
    r"(?:,? in (?:an? )?(?P<style>[a-z ]+?) style)?$"
)


_SYNONYM_RE = re.compile(rf"\b(?:{'|'.join(SYNONYMS)})\b")


def _normalise(prompt: str) -> str:
    """Lower case, single spaces, no final period, "top-left" -> "top left", synonyms -> world names."""
    text = " ".join(prompt.lower().replace(" ,", ",").replace("-", " ").split()).rstrip(".")
    return _SYNONYM_RE.sub(lambda m: SYNONYMS[m[0]], text)


def parse_prompt(prompt: str) -> Scene:
    """Read a Shapes-world prompt: every form :func:`scedit_ui.shapes.world.caption` writes, and more.

    Case, spacing, a final period, "grey"/"gray", "centre"/"center"/"middle", "a"/"an"/"one", "at/in/on
    the <position>" or none, "on a X background" / "on X background" / ", X background" and shapes in
    any order. A shape without a position or a size parses with ``None`` there.
    """
    text = _normalise(prompt)
    m = _SCENE_RE.match(text)
    if m is None:
        raise UserInputError(
            f"Cannot read {prompt!r} as a Shapes-world prompt; write e.g. "
            "'a red circle at the top left and a small blue star on a yellow background'."
        )
    phrases = re.split(r",? and |, ", m["shapes"])
    shapes = []
    for phrase in phrases:
        p = _SHAPE_RE.match(phrase)
        if p is None:
            raise UserInputError(
                f"Cannot read the shape {phrase!r}; write '[a|an|one] [small|large] <colour> <shape> "
                "[at the <position>]', e.g. 'a small red circle at the top left'."
            )
        shapes.append(ShapeSpec(kind=p["kind"], color=p["color"], position=p["position"], size=p["size"]))
    return Scene(shapes=tuple(shapes), background=m["background"], style=m["style"])


# ---------------------------------------------------------------------------- adherence


def _match(prompted: list[ShapeSpec], detected: list[DetectedShape]) -> list[DetectedShape | None]:
    """Best one-to-one matching of prompted shapes to same-colour blobs (DP over prompted subsets)."""
    k = len(prompted)

    def gain(p: ShapeSpec, d: DetectedShape) -> int:
        if p.color != d.color:
            return 0
        return 4 + 2 * (p.kind == d.kind) + (p.position is not None and p.position == d.position)

    # best[mask] = (score, assignment) using the blobs seen so far, prompted set `mask` assigned.
    best: dict[int, tuple[int, tuple]] = {0: (0, (None,) * k)}
    for d in detected:
        for mask, (score, assign) in list(best.items()):
            for i in range(k):
                if mask & (1 << i):
                    continue
                g = gain(prompted[i], d)
                if g == 0:
                    continue
                new = mask | (1 << i)
                if new not in best or best[new][0] < score + g:
                    best[new] = (score + g, assign[:i] + (d,) + assign[i + 1:])
    return list(max(best.values(), key=lambda v: v[0])[1])


_FRAGMENT_GAP = 2  # pixels between bounding boxes: a blob this close to a matched one is a piece of that drawn shape


def _bbox_gap(a: DetectedShape, b: DetectedShape) -> int:
    """Pixels between two bounding boxes (0 when they touch or overlap)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.bbox, b.bbox
    return max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh), 0)


def _unmatched_kinds(scene: Scene, detected: list[DetectedShape], matched: list[DetectedShape | None]) -> tuple[int, int, int]:
    """(fragments, copies, strays) among the blobs no prompted shape was matched to."""
    used = [d for d in matched if d is not None]
    fragments = copies = strays = 0
    for d in detected:
        if any(d is m for m in used):
            continue
        if any(_bbox_gap(m, d) <= _FRAGMENT_GAP for m in used):
            fragments += 1
        elif any(p.color == d.color for p in scene.shapes):
            copies += 1
        else:
            strays += 1
    return fragments, copies, strays


def score_adherence(image, scene_or_prompt: Scene | str) -> Adherence:
    """Score ``image`` against a scene or a prompt; see the module docstring."""
    scene = parse_prompt(scene_or_prompt) if isinstance(scene_or_prompt, str) else scene_or_prompt
    detected = detect_shapes(image)
    matched = _match(list(scene.shapes), detected)
    k = len(scene.shapes)
    pairs = [(p, d) for p, d in zip(scene.shapes, matched) if d is not None]
    cells_correct = tuple(
        None if p.position is None else d is not None and d.position == p.position for p, d in zip(scene.shapes, matched)
    )
    placed = [c for c in cells_correct if c is not None]
    fragments, copies, strays = _unmatched_kinds(scene, detected, matched)
    return Adherence(
        color_correct=len(pairs) / k,
        shape_correct=sum(p.kind == d.kind for p, d in pairs) / k,
        count_correct=len(detected) == k,
        background_correct=detect_background(image) == scene.background,
        position_correct=sum(placed) / len(placed) if placed else None,
        cells_correct=cells_correct,
        extra_blobs=len(detected) - k,
        fragments=fragments,
        copies=copies,
        strays=strays,
    )


# ---------------------------------------------------------------------------- styles


def _highpass(gray: np.ndarray, sigma: float) -> np.ndarray:
    hp = gray - cv2.GaussianBlur(gray, (0, 0), sigma)
    return hp - hp.mean()


def _autocorr(hp: np.ndarray, dx: int, dy: int) -> float:
    """Normalised autocorrelation of ``hp`` at shift (dx, dy) over the overlapping region."""
    h, w = hp.shape
    a = hp[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)]
    b = hp[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-6 else 0.0


def _stripes_score(gray: np.ndarray) -> float:
    hp = _highpass(gray, 6.0)
    # Along diagonal stripes the pattern repeats at every shift; across them it alternates.
    along = max(min(_autocorr(hp, k, sign * k) for k in (3, 5)) for sign in (1, -1))
    across = max((_autocorr(hp, p, 0) - _autocorr(hp, p // 2, 0)) / 2 for p in range(12, 21))
    return max(0.0, min(along, across))


def _dots_score(gray: np.ndarray) -> float:
    hp = _highpass(gray, 4.0)
    best = 0.0
    for s in range(9, 17):
        lattice = min(_autocorr(hp, s, 0), _autocorr(hp, 0, s))
        half = max(_autocorr(hp, s // 2, 0), _autocorr(hp, 0, s // 2), _autocorr(hp, s // 2, -(s // 2)))
        best = max(best, lattice - max(half, 0.0))
    return best


def _sketch_score(rgb: np.ndarray) -> float:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    paper = (hsv[..., 2] > 200) & (hsv[..., 1] < 50)
    ink = ~paper
    if not paper.any() or not ink.any():
        return 0.0
    thick = cv2.erode(ink.astype(np.uint8), np.ones((5, 5), np.uint8)).sum()
    thinness = 1.0 - thick / ink.sum()
    neutral = (hsv[..., 1][ink] < 80).mean()  # graphite, not coloured paint
    return float(paper.mean() * thinness * neutral)


def _pixelate_score(rgb: np.ndarray, block: int = PIXEL_BLOCK) -> float:
    smooth = cv2.medianBlur(rgb, 5).astype(np.float32)  # noise off, block edges kept
    profile = np.zeros(block)
    for axis in (0, 1):
        energy = (np.diff(smooth, axis=axis) ** 2).sum(axis=(1 - axis, 2))
        n = len(energy) // block * block
        profile += energy[:n].reshape(-1, block).sum(0)
    spectrum = np.fft.rfft(profile)
    ratio = abs(spectrum[1]) / max(spectrum[0].real, 1e-6)  # 1 for edges on one phase only, 0 if even
    return float(np.clip((ratio - 0.2) / 0.6, 0.0, 1.0))


def style_score(image, style: str) -> float:
    """How strongly ``image`` shows ``style``, in [0, 1]; see the module docstring."""
    if style not in STYLES:
        raise UserInputError(f"Unknown style {style!r}; choose one of: {', '.join(STYLES)}.")
    rgb = _as_rgb(image)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if style == "stripes":
        score = _stripes_score(gray)
    elif style == "polka dots":
        score = _dots_score(gray)
    elif style == "outline sketch":
        score = _sketch_score(rgb)
    else:
        score = _pixelate_score(rgb)
    return float(np.clip(score, 0.0, 1.0))

