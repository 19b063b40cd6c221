"""Skip-connection editing of diffusers UNets: SC-Tuner, CSC-Tuner and Skip-Tuning.

Pure PyTorch + the diffusers UNet structure; nothing here imports Gradio or pipelines.
"""
from tuners.csc_tuner import CSCTuner, CSCTunerConfig, interpolate_features
from tuners.editor import ControlCondition, FeatureCache, SkipEditor
from tuners.io import TunerFileError, TunerMetadata, load_tuner, read_metadata, save_tuner, tuner_from_config
from tuners.layout import LayoutMismatchError, SkipLayout, SkipShape
from tuners.official import export_official, import_official
from tuners.sc_tuner import SCTuner, SCTunerConfig, SkipAdapter
from tuners.skip_scaling import SKIP_WEIGHT_PRESETS, SkipScaling, rho_schedule, skip_weight_preset

__all__ = [
    "SKIP_WEIGHT_PRESETS",
    "CSCTuner",
    "CSCTunerConfig",
    "ControlCondition",
    "FeatureCache",
    "LayoutMismatchError",
    "SCTuner",
    "SCTunerConfig",
    "SkipAdapter",
    "SkipEditor",
    "SkipLayout",
    "SkipScaling",
    "SkipShape",
    "TunerFileError",
    "TunerMetadata",
    "export_official",
    "import_official",
    "interpolate_features",
    "load_tuner",
    "read_metadata",
    "rho_schedule",
    "save_tuner",
    "skip_weight_preset",
    "tuner_from_config",
]
