"""Training of SC-Tuners and CSC-Tuners: the run's config, its data, and the trainer the UI, CLI and tests call."""
from scedit_ui.training.config import (
    KINDS,
    TRAINABLE_CONDITIONS,
    ProgressCallback,
    TrainingConfig,
    TrainingProgress,
    TrainingResult,
    duration,
)
from scedit_ui.training.data import TrainingData, load_training_data, make_condition, prepare_caption
from scedit_ui.training.trainer import CHECKPOINT_NAME, TunerTrainer, train_tuner

__all__ = [
    "CHECKPOINT_NAME", "KINDS", "TRAINABLE_CONDITIONS", "ProgressCallback", "TrainingConfig", "TrainingData", "TrainingProgress",
    "TrainingResult", "TunerTrainer", "duration", "load_training_data", "make_condition", "prepare_caption", "train_tuner",
]
