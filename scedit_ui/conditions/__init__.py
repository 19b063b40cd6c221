"""Condition images for CSC-Tuners: the kinds registry, extraction (with its cache), pictures and annotators.

The public names are re-exported here; `scedit_ui.conditions.extract(...)` is how the app, the CLI and
training make a condition image.
"""
from scedit_ui.conditions.extraction import (
    CONDITION_CACHE,
    Condition,
    ConditionCache,
    ConditionRequest,
    extract,
    extract_condition,
    image_digest,
    random_canny_thresholds,
    random_inpaint_mask,
)
from scedit_ui.conditions.images import (
    FIT_MODES,
    MASK_FILL,
    fit_image,
    inpaint_condition,
    load_image,
    load_mask,
    mask_from_image,
    normalize_image,
    outpaint_condition,
    parse_size,
    save_image,
)
from scedit_ui.conditions.kinds import CONDITION_KINDS, ConditionKind, ParamSpec, condition_kind, describe_kinds, parse_params

__all__ = [
    "CONDITION_CACHE", "CONDITION_KINDS", "FIT_MODES", "MASK_FILL", "Condition", "ConditionCache", "ConditionKind",
    "ConditionRequest", "ParamSpec", "condition_kind", "describe_kinds", "extract", "extract_condition", "fit_image",
    "image_digest", "inpaint_condition", "load_image", "load_mask", "mask_from_image", "normalize_image",
    "outpaint_condition", "parse_params", "parse_size", "random_canny_thresholds", "random_inpaint_mask", "save_image",
]
