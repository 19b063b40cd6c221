"""What one generation asks for, its validation, and the PNG metadata that re-creates it exactly."""
from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from scedit_ui.errors import UserInputError

SCHEDULERS = ("DDIM", "DPM++ 2M", "DPM++ 2M Karras", "Euler a")
FREEU_PRESETS: dict[str, tuple[float, float, float, float]] = {  # s1, s2, b1, b2 (diffusers docs)
    "sd15": (0.9, 0.2, 1.5, 1.6),
    "sd21": (0.9, 0.2, 1.4, 1.6),
    "sdxl": (0.9, 0.2, 1.3, 1.4),
}
MAX_SEED = 2**32 - 1
# CLIP reads 77 tokens; far longer text is a mistake (or an attack on the tokenizer's time), not a prompt.
MAX_PROMPT_CHARACTERS = 10_000
METADATA_KEY = "scedit"


@dataclass(frozen=True)
class TunerUse:
    """An SC tuner file from the library, added to every skip at `scale`."""

    tuner: str
    scale: float = 1.0


@dataclass(frozen=True)
class ConditionUse:
    """A CSC tuner file with its (already extracted) condition image; see `tuners.ControlCondition`."""

    tuner: str
    image: Image.Image
    alpha: float = 1.0
    step_range: tuple[float, float] = (0.0, 1.0)
    blend_image: Image.Image | None = None
    blend: float = 0.0


@dataclass(frozen=True)
class SkipTuningSettings:
    """ρ linear from `rho_outer` (g = 0) to `rho_inner` (g = K−1); `overrides` pin single skips."""

    rho_outer: float = 1.0
    rho_inner: float = 1.0
    overrides: tuple[tuple[int, float], ...] = ()
    step_range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    width: int | None = None  # None: the base model's native size
    height: int | None = None
    scheduler: str = "DDIM"
    batch_size: int = 1
    sc_tuners: tuple[TunerUse, ...] = ()
    conditions: tuple[ConditionUse, ...] = ()
    normalise_alpha: bool = False
    skip_tuning: SkipTuningSettings | None = None
    freeu: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # notes carried into metadata

    def validated(self, native_size: int, num_skips: int | None = None) -> GenerationRequest:
        """A copy with sizes filled in, or `UserInputError` naming the first bad value; no work is done.

        With `num_skips` (the loaded UNet's), Skip-Tuning overrides must name existing skips.
        """
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if not isinstance(text, str):
                raise UserInputError(f"the {name} must be text, got {type(text).__name__}")
            if len(text) > MAX_PROMPT_CHARACTERS:
                raise UserInputError(
                    f"the {name} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARACTERS:,}; the model reads only the first 77 tokens"
                )
        for use in (*self.sc_tuners, *self.conditions):
            if not isinstance(use.tuner, (str, os.PathLike)):
                raise UserInputError(f"a tuner must be given as a file path, got {use.tuner!r}")
        for use in self.conditions:
            if not isinstance(use.image, Image.Image) or not isinstance(use.blend_image, (Image.Image, type(None))):
                raise UserInputError(f"the condition images of {Path(use.tuner).name} must be PIL images")
        # Messages name a tuner by its file name: on a server its folder means nothing to the user.
        numbers = {
            "seed": self.seed, "steps": self.steps, "guidance": self.guidance, "batch size": self.batch_size,
            **{f"scale of {Path(t.tuner).name}": t.scale for t in self.sc_tuners},
            **{f"alpha of {Path(c.tuner).name}": c.alpha for c in self.conditions},
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"{name} must be a finite number, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise UserInputError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        _check_range("seed", self.seed, 0, MAX_SEED, integer=True)
        _check_range("steps", self.steps, 1, 150, integer=True)
        _check_range("guidance", self.guidance, 0.0, 30.0)
        _check_range("batch size", self.batch_size, 1, 8, integer=True)
        width = native_size if self.width is None else self.width
        height = native_size if self.height is None else self.height
        for name, value in (("width", width), ("height", height)):
            _check_range(name, value, 64, 2048, integer=True)
            if value % 8:
                raise UserInputError(f"{name} must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        for use in self.sc_tuners:
            _check_range(f"scale of {Path(use.tuner).name}", use.scale, -4.0, 4.0)
        for use in self.conditions:
            _check_range(f"alpha of {Path(use.tuner).name}", use.alpha, 0.0, 4.0)
            _check_step_range(f"step range of {Path(use.tuner).name}", use.step_range)
            _check_range(f"blend of {Path(use.tuner).name}", use.blend, 0.0, 1.0)
        if self.normalise_alpha and self.conditions and sum(c.alpha for c in self.conditions) <= 0:
            raise UserInputError("cannot normalise α: the condition weights sum to 0")
        if self.skip_tuning is not None:
            st = self.skip_tuning
            for name, value in [("ρ outer", st.rho_outer), ("ρ inner", st.rho_inner), *((f"ρ of skip {g}", r) for g, r in st.overrides)]:
                _check_range(name, value, 0.0, 4.0)
            last_skip = num_skips - 1 if num_skips is not None else math.inf
            for g, _ in st.overrides:
                _check_range("Skip-Tuning skip index", g, 0, last_skip, integer=True)
            _check_step_range("Skip-Tuning step range", st.step_range)
        if self.freeu is not None:
            if len(self.freeu) != 4:
                raise UserInputError(f"FreeU needs four factors s1, s2, b1, b2, got {self.freeu}")
            for name, value in zip(("s1", "s2", "b1", "b2"), self.freeu):
                _check_range(f"FreeU {name}", value, 0.0, 4.0)
        return replace(self, width=width, height=height)

    # -- metadata --------------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        for condition, raw in zip(self.conditions, data["conditions"]):
            raw["image"] = _image_to_text(condition.image)
            raw["blend_image"] = _image_to_text(condition.blend_image) if condition.blend_image is not None else None
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GenerationRequest:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["sc_tuners"] = tuple(TunerUse(**t) for t in data.get("sc_tuners", ()))
        data["conditions"] = tuple(
            ConditionUse(
                **{
                    **c,
                    "image": _image_from_text(c["image"]),
                    "blend_image": _image_from_text(c["blend_image"]) if c.get("blend_image") else None,
                    "step_range": tuple(c["step_range"]),
                }
            )
            for c in data.get("conditions", ())
        )
        if data.get("skip_tuning"):
            st = data["skip_tuning"]
            data["skip_tuning"] = SkipTuningSettings(
                st["rho_outer"], st["rho_inner"], tuple(tuple(o) for o in st["overrides"]), tuple(st["step_range"])
            )
        if data.get("freeu"):
            data["freeu"] = tuple(data["freeu"])
        return cls(**data)

    def a1111_parameters(self, seed: int, model_name: str) -> str:
        """The A1111-style `parameters` text that image browsers show."""
        settings = [
            f"Steps: {self.steps}", f"Sampler: {self.scheduler}", f"CFG scale: {self.guidance}", f"Seed: {seed}",
            f"Size: {self.width}x{self.height}", f"Model: {model_name}",
        ]
        settings += [f"SC tuner: {t.tuner} ({t.scale})" for t in self.sc_tuners]
        settings += [f"Control: {c.tuner} (α {c.alpha}, steps {c.step_range[0]}-{c.step_range[1]})" for c in self.conditions]
        if self.skip_tuning is not None:
            settings.append(f"Skip-Tuning ρ: {self.skip_tuning.rho_outer}->{self.skip_tuning.rho_inner}")
        if self.freeu is not None:
            settings.append(f"FreeU: {','.join(map(str, self.freeu))}")
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{', '.join(settings)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: float, low: float, high: float, integer: bool = False) -> None:
    if integer and not (isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if not (_is_number(value) and math.isfinite(value) and low <= value <= high):
        raise UserInputError(f"{name} must be between {low} and {high}, got {value!r}")


def _check_step_range(name: str, step_range: tuple[float, float]) -> None:
    if not (isinstance(step_range, (tuple, list)) and len(step_range) == 2 and all(_is_number(v) for v in step_range)):
        raise UserInputError(f"{name} must be two numbers (start, end), got {step_range!r}")
    start, end = step_range
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise UserInputError(f"{name} must satisfy 0 ≤ start ≤ end ≤ 1, got {step_range}")


def _image_to_text(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_from_text(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def attach_metadata(image: Image.Image, request: GenerationRequest, index: int, seed: int, model_name: str) -> Image.Image:
    """Put the A1111 `parameters` text and the exact request JSON into `image.info` (kept by PNG saves)."""
    image.info["parameters"] = request.a1111_parameters(seed, model_name)
    image.info[METADATA_KEY] = json.dumps({"request": json.loads(request.to_json()), "index": index, "model": model_name})
    return image


def png_info(image: Image.Image) -> PngInfo:
    info = PngInfo()
    for key in ("parameters", METADATA_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])
    return info


def save_png(image: Image.Image, path: str) -> None:
    image.save(path, format="PNG", pnginfo=png_info(image))


def request_from_png(image: Image.Image) -> tuple[GenerationRequest, int, str]:
    """The request, image index in its batch and model name stored in a generated PNG."""
    text = image.info.get(METADATA_KEY)
    if not text:
        raise UserInputError("this image carries no SCEdit Studio metadata (was it saved as PNG by this app?)")
    # The text may have been edited or damaged: anything unexpected in it is one clear error.
    try:
        data = json.loads(text)
        request = GenerationRequest.from_json(json.dumps(data["request"]))
        index, model = data["index"], data["model"]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise UserInputError(f"the SCEdit Studio metadata of this image is damaged ({type(error).__name__}: {error})") from None
    try:
        request.validated(native_size=request.width or 512)
        _check_range("image index", index, 0, request.batch_size - 1, integer=True)
    except UserInputError as error:
        raise UserInputError(f"the SCEdit Studio metadata of this image is damaged: {error}") from None
    return request, int(index), str(model)


def read_png_request(path: str | Path) -> tuple[GenerationRequest, int, str]:
    """`request_from_png` of the image file at `path`; a file that is no readable image is one clear error."""
    name = Path(path).name
    try:
        with Image.open(path) as image:  # the text chunks are read here; the pixels are never decoded
            return request_from_png(image)
    except UserInputError:
        raise
    except Image.DecompressionBombError:
        raise UserInputError(f"{name} is too large to open safely") from None
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise UserInputError(f"{name} is not a PNG that can be read ({type(error).__name__})") from None
