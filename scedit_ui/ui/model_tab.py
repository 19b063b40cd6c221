"""Model tab: the loaded base model and device; load another (folder, single file, hub id)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from scedit_ui.ui.handlers import GPU_QUEUE, on_gpu, user_errors
from scedit_ui.ui.state import AppState
from tuners.validation import UserInputError

FAMILY_NAMES = {
    "tiny": "built-in tiny model (SD 1.5 blocks)", "sd15": "Stable Diffusion 1.x", "sd21": "Stable Diffusion 2.x", "sdxl": "SDXL",
    "custom": "custom U-Net",
}


@dataclass
class ModelTab:
    summary: gr.Markdown
    load_event: gr.events.Dependency  # other tabs follow a successful load with `.success`


def describe_model(state: AppState) -> str:
    """A Markdown summary of the loaded base model."""
    info = state.manager.info()
    channels = ", ".join(str(c) for c in info.skip_channels)
    return (
        f"| base model | {info.name} |\n|---|---|\n"
        f"| family | {FAMILY_NAMES.get(info.family, info.family)} |\n"
        f"| device | {info.device} ({info.dtype}) |\n"
        f"| native size | {info.native_size} px |\n"
        f"| skip connections | {info.num_skips} ({channels} channels) |"
    )


def load_model(state: AppState, name: str, config: str | None = None) -> str:
    """Load another base model in place of the current one; its summary."""
    name = (name or "").strip()
    if not name:
        raise UserInputError("enter a diffusers folder, a .safetensors file or a hub id (or 'tiny' for the built-in model)")
    state.manager.load(name, (config or "").strip() or None)
    return describe_model(state)


def build(state: AppState) -> ModelTab:
    summary = gr.Markdown(describe_model(state), elem_id="model-summary")
    with gr.Group():
        with gr.Row():
            name = gr.Textbox(label="Base model", elem_id="model-name", scale=3,
                              placeholder="folder with model_index.json, model.safetensors, owner/name on the hub, or 'tiny'")
            config = gr.Textbox(label="Config folder (single-file checkpoints only)", scale=2,
                                placeholder="a diffusers folder of the same architecture")
        load_button = gr.Button("Load base model", variant="primary", elem_id="load-model-button")
    with gr.Accordion("Memory options", open=False):
        with gr.Row():
            slicing = gr.Checkbox(False, label="Attention slicing (less memory, a bit slower)")
            tiling = gr.Checkbox(False, label="VAE tiling (large images)")
        apply_button = gr.Button("Apply", size="sm")
        memory_status = gr.Markdown()

    @user_errors
    def load(model: str, config: str, progress=gr.Progress(track_tqdm=True)) -> str:
        """Load a base model (diffusers folder, single .safetensors file with an optional config folder, or hub id)."""
        progress(0, desc=f"loading {model}")
        return load_model(state, model, config)

    @user_errors
    def memory(attention_slicing: bool, vae_tiling: bool) -> str:
        """Turn attention slicing and VAE tiling on or off for the loaded model."""
        state.manager.set_memory_options(attention_slicing, vae_tiling)
        return f"attention slicing {'on' if attention_slicing else 'off'}, VAE tiling {'on' if vae_tiling else 'off'}"

    load_event = load_button.click(on_gpu(load), [name, config], summary, api_name="load_model", concurrency_id=GPU_QUEUE)
    apply_button.click(memory, [slicing, tiling], memory_status, api_name="memory_options", concurrency_id=GPU_QUEUE)
    return ModelTab(summary, load_event)
