"""The one offline check for everything that may reach the Hugging Face Hub (models, annotators, tuners)."""
from __future__ import annotations

import os

from huggingface_hub import constants


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set.

    huggingface_hub reads both once, at import (`constants.HF_HUB_OFFLINE`); they are read again here, with
    its own parser, so that setting one in a running app (or a test) takes effect.
    """
    live = constants._is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or live
