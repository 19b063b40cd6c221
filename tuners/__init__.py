"""Skip-connection editing of diffusers UNets: SC-Tuner, CSC-Tuner and Skip-Tuning.

Pure PyTorch + the diffusers UNet structure; nothing here imports Gradio or pipelines.
The names below load their module on first use, so that `tuners.validation` (which the app's
light modules import) costs no torch import.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "ALPHA_MODES": "composition", "composed_alphas": "composition", "composed_step_ranges": "composition",
    "CSCTuner": "csc_tuner", "CSCTunerConfig": "csc_tuner", "interpolate_features": "csc_tuner",
    "ControlCondition": "editor", "FeatureCache": "editor", "SkipEditor": "editor",
    "TunerFileError": "io", "TunerMetadata": "io", "load_tuner": "io", "read_metadata": "io", "save_tuner": "io",
    "tuner_from_config": "io",
    "LayoutMismatchError": "layout", "SkipLayout": "layout", "SkipShape": "layout",
    "export_official": "official", "import_official": "official",
    "SCTuner": "sc_tuner", "SCTunerConfig": "sc_tuner", "SkipAdapter": "sc_tuner",
    "SKIP_WEIGHT_PRESETS": "skip_scaling", "SkipScaling": "skip_scaling", "rho_schedule": "skip_scaling",
    "skip_weight_preset": "skip_scaling",
    "UserInputError": "validation",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'tuners' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tuners.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return __all__
