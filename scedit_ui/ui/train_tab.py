"""Train tab (placeholder until scedit_ui.training lands)."""
from __future__ import annotations

import gradio as gr

from scedit_ui.ui.state import AppState


def build(state: AppState, library_version: gr.State) -> None:
    gr.Markdown("Training is not available yet.")
