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

from tuners.composition import DEFAULT_ALPHA_MODE, composed_alphas
from tuners.validation import SCALE_RANGE, WEIGHT_RANGE, UserInputError, check_choice, check_number, check_per_skip, check_step_range

SCHEDULERS = ("DDIM", "DPM++ 2M", "DPM++ 2M Karras", "Euler a")
FREEU_PRESETS: dict[str, tuple[float, float, float, float]] = {  # s1, s2, b1, b2 (diffusers docs)
    "sd15": (0.9, 0.2, 1.5, 1.6),
    "sd21": (0.9, 0.2, 1.4, 1.6),
    "sdxl": (0.9, 0.2, 1.3, 1.4),
}
MAX_SEED = 2**32 - 1
# CLIP reads 77 tokens; far longer text is a mistake (or an attack on the tokenizer's time), not a prompt.
MAX_PROMPT_CHARACTERS = 10_000
PNG_RECIPE_KEY = "scedit"
PNG_GRID_KEY = "scedit_grid"  # a compare grid's axes; its PNG_RECIPE_KEY chunk holds the base request


@dataclass(frozen=True)
class TunerUse:
    """An SC tuner file from the library, added to every skip at `scale`.

    With `conditional_only` it edits only the prompt's half of classifier-free guidance, so guidance amplifies
    the tuner's effect as it amplifies the prompt (without guidance there is one half and nothing changes).
    With `texture` (texture guidance) it adds `scale` times the fine texture of its change and leaves the colours
    and layout to the base model (`tuners.editor`). At most one of the two.
    """

    tuner: str
    scale: float = 1.0
    conditional_only: bool = False
    texture: bool = False

    @classmethod
    def of_file(cls, path: str | Path, scale: float | None = None, conditional_only: bool | None = None,
                texture: bool | None = None) -> TunerUse:
        """The tuner file at `path`, with what is not given (None) taken from the file's own defaults; naming
        either way of applying it (`conditional_only` or `texture`) decides both."""
        from tuners import TunerFileError, read_metadata

        try:
            metadata = read_metadata(path)
        except TunerFileError as error:
            raise UserInputError(str(error)) from None
        if conditional_only is None and texture is None:
            conditional_only, texture = metadata.default_conditional_only, metadata.default_texture
        return cls(str(path), metadata.default_scale if scale is None else scale, bool(conditional_only) and not texture, bool(texture))

    @property
    def how(self) -> str:
        """How it is applied, in words (metadata text, messages)."""
        return "texture guidance" if self.texture else "style guidance" if self.conditional_only else "both halves"


@dataclass(frozen=True)
class ConditionUse:
    """A CSC tuner file with its (already extracted) condition image; see `tuners.ControlCondition`.

    `mask` is a spatial α map (white: full α, black: none; any size, stretched to the image), and
    `skip_weights` scale α per skip (encoder order g; `tuners.skip_weight_preset` makes the presets).
    """

    tuner: str
    image: Image.Image
    alpha: float = 1.0
    step_range: tuple[float, float] = (0.0, 1.0)
    blend_image: Image.Image | None = None
    blend: float = 0.0
    mask: Image.Image | None = None
    skip_weights: tuple[float, ...] | None = None


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
    alpha_mode: str = DEFAULT_ALPHA_MODE  # how the conditions' α combine (tuners.composition)
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
            if not isinstance(use.image, Image.Image) or not all(isinstance(i, (Image.Image, type(None))) for i in (use.blend_image, use.mask)):
                raise UserInputError(f"the condition images and mask of {Path(use.tuner).name} must be PIL images")
            if use.skip_weights is not None:
                check_per_skip(f"per-skip α of {Path(use.tuner).name}", use.skip_weights, num_skips, *WEIGHT_RANGE)
        # Messages name a tuner by its file name: on a server its folder means nothing to the user.
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        check_number("steps", self.steps, 1, 150, integer=True)
        check_number("guidance", self.guidance, 0.0, 30.0)
        check_number("batch size", self.batch_size, 1, 8, integer=True)
        width = native_size if self.width is None else self.width
        height = native_size if self.height is None else self.height
        for name, value in (("width", width), ("height", height)):
            check_number(name, value, 64, 2048, integer=True)
            if value % 8:
                raise UserInputError(f"{name} must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        for use in self.sc_tuners:
            check_number(f"scale of {Path(use.tuner).name}", use.scale, *SCALE_RANGE)
            for name in ("conditional_only", "texture"):
                if not isinstance(getattr(use, name), bool):
                    raise UserInputError(f"{name} of {Path(use.tuner).name} must be true or false, got {getattr(use, name)!r}")
            if use.conditional_only and use.texture:
                raise UserInputError(f"{Path(use.tuner).name}: choose style guidance or texture guidance, not both")
        for use in self.conditions:
            check_number(f"alpha of {Path(use.tuner).name}", use.alpha, *WEIGHT_RANGE)
            check_step_range(f"step range of {Path(use.tuner).name}", use.step_range)
            check_number(f"blend of {Path(use.tuner).name}", use.blend, 0.0, 1.0)
        composed_alphas([c.alpha for c in self.conditions], self.alpha_mode)  # refuses an unknown mode or α it cannot normalise
        if self.skip_tuning is not None:
            st = self.skip_tuning
            for name, value in [("ρ outer", st.rho_outer), ("ρ inner", st.rho_inner), *((f"ρ of skip {g}", r) for g, r in st.overrides)]:
                check_number(name, value, *WEIGHT_RANGE)
            last_skip = num_skips - 1 if num_skips is not None else math.inf
            for g, _ in st.overrides:
                check_number("Skip-Tuning skip index", g, 0, last_skip, integer=True)
            check_step_range("Skip-Tuning step range", st.step_range)
        if self.freeu is not None:
            if len(self.freeu) != 4:
                raise UserInputError(f"FreeU needs four factors s1, s2, b1, b2, got {self.freeu}")
            for name, value in zip(("s1", "s2", "b1", "b2"), self.freeu):
                check_number(f"FreeU {name}", value, 0.0, 4.0)
        return replace(self, width=width, height=height)

    # -- metadata --------------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        for condition, raw in zip(self.conditions, data["conditions"]):
            raw["image"] = _image_to_text(condition.image)
            raw["blend_image"] = _image_to_text(condition.blend_image) if condition.blend_image is not None else None
            raw["mask"] = _image_to_text(condition.mask.convert("L")) if condition.mask is not None else None
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GenerationRequest:
        data = json.loads(text)
        if "alpha_mode" not in data:  # made before the α cap: the α were applied as given, or normalised
            data["alpha_mode"] = "normalise" if data.get("normalise_alpha") else "raw"
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["sc_tuners"] = tuple(TunerUse(**t) for t in data.get("sc_tuners", ()))
        data["conditions"] = tuple(
            ConditionUse(
                **{
                    **c,
                    "image": _image_from_text(c["image"]),
                    "blend_image": _image_from_text(c["blend_image"]) if c.get("blend_image") else None,
                    "mask": _image_from_text(c["mask"]).convert("L") if c.get("mask") else None,
                    "skip_weights": tuple(c["skip_weights"]) if c.get("skip_weights") is not None else None,
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
        settings += [f"SC tuner: {t.tuner} ({t.scale}{'' if t.how == 'both halves' else ', ' + t.how})" for t in self.sc_tuners]
        applied = composed_alphas([c.alpha for c in self.conditions], self.alpha_mode)
        settings += [
            f"Control: {c.tuner} (α {c.alpha}" + (f" applied as {a:.3g}" if a != c.alpha else "")
            + f", steps {c.step_range[0]}-{c.step_range[1]}"
            + (", masked" if c.mask is not None else "")
            + (f", per-skip α {','.join(f'{w:g}' for w in c.skip_weights)}" if c.skip_weights is not None else "")
            + ")"
            for c, a in zip(self.conditions, applied)
        ]
        if len(self.conditions) > 1:
            settings.append(f"Conditions combined: {self.alpha_mode}")
        if self.skip_tuning is not None:
            settings.append(f"Skip-Tuning ρ: {self.skip_tuning.rho_outer}->{self.skip_tuning.rho_inner}")
        if self.freeu is not None:
            settings.append(f"FreeU: {','.join(map(str, self.freeu))}")
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{', '.join(settings)}"


def _image_to_text(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_from_text(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def attach_metadata(image: Image.Image, request: GenerationRequest, index: int, seed: int, model_name: str) -> Image.Image:
    """Put the A1111 `parameters` text and the exact request JSON into `image.info` (kept by PNG saves)."""
    image.info["parameters"] = request.a1111_parameters(seed, model_name)
    image.info[PNG_RECIPE_KEY] = json.dumps({"request": json.loads(request.to_json()), "index": index, "model": model_name})
    return image


def png_info(image: Image.Image) -> PngInfo:
    info = PngInfo()
    for key in ("parameters", PNG_RECIPE_KEY, PNG_GRID_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])
    return info


def save_png(image: Image.Image, path: str) -> None:
    image.save(path, format="PNG", pnginfo=png_info(image))


def request_from_png(image: Image.Image) -> tuple[GenerationRequest, int, str]:
    """The request, image index in its batch and model name stored in a generated PNG."""
    text = image.info.get(PNG_RECIPE_KEY)
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
        check_number("image index", index, 0, request.batch_size - 1, integer=True)
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
