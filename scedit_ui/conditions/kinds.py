"""The condition kinds and their parameters: what the UI builds controls from and the CLI parses."""
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from scedit_ui.conditions import annotators
from scedit_ui.conditions.images import MASK_FILL
from tuners.validation import UserInputError, check_choice, check_number

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
            return check_choice(self.name, value, self.choices)
        number_type = int if self.type == "int" else float
        try:
            number = number_type(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{self.name} must be a number ({self.type}), not {value!r}") from None
        if number_type is int and number != float(value):
            raise UserInputError(f"{self.name} must be a whole number, not {value!r}")
        low = -math.inf if self.minimum is None else self.minimum
        high = math.inf if self.maximum is None else self.maximum
        return check_number(self.name, number, low, high, integer=number_type is int)

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
                (ParamSpec("ratio", "int", 0, "cell size in pixels; 0: 1/8 of the shorter side (8 cells across, SD's 64 at 512 px)", 0, 512),),
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

