"""Training of SC-Tuners and CSC-Tuners: the run's config, its data, and the trainer the UI, CLI and tests call."""
from scedit_ui.training.config import KINDS, TRAINABLE_CONDITIONS, ProgressCallback, TrainingConfig, TrainingProgress, TrainingResult
from scedit_ui.training.data import TrainingData, load_training_data, make_condition, prepare_caption
from scedit_ui.training.trainer import TunerTrainer, train_tuner

__all__ = [
    "KINDS", "TRAINABLE_CONDITIONS", "ProgressCallback", "TrainingConfig", "TrainingData", "TrainingProgress",
    "TrainingResult", "TunerTrainer", "load_training_data", "make_condition", "prepare_caption", "train_tuner",
]
