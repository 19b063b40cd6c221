"""Skip-connection editing of diffusers UNets: SC-Tuner, CSC-Tuner and Skip-Tuning.

Pure PyTorch + the diffusers UNet structure; nothing here imports Gradio or pipelines.
"""
from tuners.csc_tuner import CSCTuner, interpolate_features
from tuners.editor import ConditionCache, ControlCondition, SkipEditor
from tuners.io import TunerFileError, TunerMetadata, load_tuner, read_metadata, save_tuner
from tuners.layout import LayoutMismatchError, SkipLayout
from tuners.sc_tuner import SCTuner, SkipAdapter
from tuners.skip_scaling import SkipScaling, rho_schedule

__all__ = [
    "CSCTuner",
    "ConditionCache",
    "ControlCondition",
    "LayoutMismatchError",
    "SCTuner",
    "SkipAdapter",
    "SkipEditor",
    "SkipLayout",
    "SkipScaling",
    "TunerFileError",
    "TunerMetadata",
    "interpolate_features",
    "load_tuner",
    "read_metadata",
    "rho_schedule",
    "save_tuner",
]
