"""Generate tab: text to image with SC tuners from the library; PNGs keep their settings."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from scedit_ui.request import MAX_SEED, SCHEDULERS, GenerationRequest, TunerUse, read_png_request
from scedit_ui.shapes.world import caption, sample_scene
from scedit_ui.ui.handlers import GPU_QUEUE, on_gpu, step_progress, user_errors, whole_number
from scedit_ui.ui.state import AppState
from tuners.validation import UserInputError

TUNER_SLOTS = 3
MAX_SIZE = 2048


@dataclass
class GenerateTab:
    """What other tabs wire to."""

    width: gr.Slider
    height: gr.Slider
    tuners: list[gr.Dropdown]
    scales: list[gr.Slider]
    conditional_only: gr.Checkbox
    texture: gr.Checkbox
    gallery: gr.Gallery
    selected: gr.State  # index of the clicked gallery image
    send_to_control: gr.Button
    send_to_skip_tuning: gr.Button


# -- plain functions -----------------------------------------------------------------------------


def pick_seed(seed: float | int | None) -> int:
    """`seed` itself, or a fresh random seed when it is -1 (or empty)."""
    if seed is None or seed == -1:
        return random.randint(0, MAX_SEED)
    return whole_number("seed", seed)


def request_from_form(
    prompt: str, negative_prompt: str | None, seed: float | int | None, steps: float, guidance: float, width: float, height: float,
    scheduler: str, **fields: Any,
) -> GenerationRequest:
    """A request from the settings every generating tab shows (numbers as the form sends them), plus `fields`."""
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt or "", seed=pick_seed(seed), steps=whole_number("steps", steps),
        guidance=float(guidance), width=whole_number("width", width), height=whole_number("height", height), scheduler=scheduler,
        **fields,
    )


@dataclass
class SettingsForm:
    """The settings every generating tab shows; `inputs` is in `request_from_form`'s order."""

    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    scheduler: gr.Dropdown

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative, self.seed, self.steps, self.guidance, self.width, self.height, self.scheduler]

    @staticmethod
    def values(request: GenerationRequest, image_index: int = 0) -> tuple:
        """The values (in `inputs` order) that re-create image `image_index` of `request`."""
        return (request.prompt, request.negative_prompt, request.seed + image_index, request.steps, request.guidance,
                request.width, request.height, request.scheduler)


def settings_form(tab: str, native_size: int, seed: int = -1, steps: int = 20, steps_label: str = "Steps") -> SettingsForm:
    """Prompt, negative prompt, seed, steps, guidance, size and scheduler, laid out in three rows (elem ids `TAB-prompt`, `TAB-steps`)."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        seed_box = gr.Number(label="Seed (-1 = random)", value=seed, precision=0, minimum=-1, maximum=MAX_SEED)
        steps_slider = gr.Slider(1, 150, value=steps, step=1, label=steps_label, elem_id=f"{tab}-steps")
        guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="Guidance")
    with gr.Row():
        width = gr.Slider(64, MAX_SIZE, value=native_size, step=8, label="Width")
        height = gr.Slider(64, MAX_SIZE, value=native_size, step=8, label="Height")
        scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Scheduler")
    return SettingsForm(prompt, negative, seed_box, steps_slider, guidance, width, height, scheduler)


def tuner_uses(state: AppState, names: list[str | None], scales: list[float], conditional_only: bool, texture: bool = False) -> tuple[TunerUse, ...]:
    """The chosen SC tuners (library names) with their scales; empty slots are skipped."""
    return tuple(
        TunerUse(str(state.library.find(name)), float(scale), bool(conditional_only), bool(texture)) for name, scale in zip(names, scales) if name
    )


def generate_images(state: AppState, request: GenerationRequest, progress=None) -> tuple[list[str], str]:
    """Run `request`, save the PNGs; their paths and a one-line summary."""
    result = state.manager.generate(request, progress=step_progress(progress, "denoising"))
    paths = state.save_outputs(result.images, f"seed{request.seed}")
    return paths, describe_result(request, result.seconds, result.notices)


def describe_result(request: GenerationRequest, seconds: float, notices: list[str]) -> str:
    size = f"{request.width}×{request.height}" if request.width else "native size"
    seeds = f"seed {request.seed}" if request.batch_size == 1 else f"seeds {request.seed}–{request.seed + request.batch_size - 1}"
    lines = [f"{seeds} · {size} · {request.scheduler}, {request.steps} steps, guidance {request.guidance:g} · {seconds:.1f} s"]
    return "\n\n".join(lines + [f"**Note:** {notice}" for notice in notices])


def settings_from_png(state: AppState, path: str | None) -> tuple:
    """The Generate settings stored in a PNG made by this app (seed of that very image)."""
    if not path:
        raise UserInputError("drop a PNG generated by this app to read its settings")
    request, index, _ = read_png_request(path)
    known = set(state.library.names())
    slots: list = []
    for i in range(TUNER_SLOTS):
        use = request.sc_tuners[i] if i < len(request.sc_tuners) else None
        name = Path(use.tuner).stem if use else None
        slots += [name if name in known else None, use.scale if use else 1.0]
    return (*SettingsForm.values(request, index), *slots, any(use.conditional_only for use in request.sc_tuners),
            any(use.texture for use in request.sc_tuners))


def selected_image(gallery: list | None, index: int | None) -> str:
    """Path of the selected gallery image (the first one when none was clicked)."""
    if not gallery:
        raise UserInputError("generate an image first")
    index = index if index is not None and 0 <= index < len(gallery) else 0
    item = gallery[index]
    return item[0] if isinstance(item, (tuple, list)) else item


def example_prompts(count: int = 4) -> list[str]:
    """Shapes-world captions the built-in model never saw in training."""
    return [caption(sample_scene(seed, split="heldout")) for seed in range(count)]


# -- the tab -------------------------------------------------------------------------------------


def build(state: AppState) -> GenerateTab:
    native = state.manager.native_size
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, value=example_prompts(1)[0], elem_id="generate-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row(equal_height=True):
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED, scale=2)
                with gr.Column(scale=1, min_width=120):
                    random_seed = gr.Button("Random seed", size="sm")
                    reuse_seed = gr.Button("Reuse last seed", size="sm")
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="generate-steps")
                guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="Guidance")
            with gr.Row():
                width = gr.Slider(64, MAX_SIZE, value=native, step=8, label="Width")
                height = gr.Slider(64, MAX_SIZE, value=native, step=8, label="Height")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Scheduler")
                batch = gr.Slider(1, 8, value=1, step=1, label="Batch", elem_id="generate-batch")
            with gr.Accordion("SC tuners", open=True):
                tuners, scales = [], []
                for i in range(TUNER_SLOTS):
                    with gr.Row():
                        tuners.append(gr.Dropdown(state.tuner_names("sc"), value=None, label=f"Tuner {i + 1}", allow_custom_value=True,
                                                  scale=2, elem_id=f"generate-tuner-{i + 1}"))
                        scales.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Scale", scale=1, elem_id=f"generate-scale-{i + 1}"))
                conditional_only = gr.Checkbox(
                    False, label="Style guidance: tuners act on the prompt's side of guidance only",
                    info="Guidance then amplifies the style as it does the prompt; use a lower scale (about 0.25–0.5). "
                    "Picking a tuner sets the scale and these boxes to what its file asks for (measured when it was trained).",
                    elem_id="generate-style-guidance",
                )
                texture = gr.Checkbox(
                    False, label="Texture guidance: tuners add only their fine texture; colours and layout stay the model's",
                    info="Scale is the texture's strength (about 2). One larger batch per step: about 1.5x the time.",
                    elem_id="generate-texture-guidance",
                )
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images (PNG with settings)", format="png", columns=2, height=620, object_fit="contain", interactive=False, elem_id="generate-gallery")
            info = gr.Markdown(elem_id="generate-info")
            with gr.Row():
                send_to_control = gr.Button("Send to Control", size="sm")
                send_to_skip_tuning = gr.Button("Send to Skip-Tuning", size="sm")
            with gr.Accordion("Read settings from a PNG", open=False):
                png = gr.File(label="PNG made by this app", file_types=[".png"], type="filepath")
    gr.Examples([[p] for p in example_prompts()], inputs=[prompt], label="Held-out prompts")

    selected = gr.State(None)
    last_seed = gr.State(None)

    @user_errors
    def generate(
        prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float, width: int, height: int, scheduler: str,
        batch_size: int, tuner_1: str | None = None, scale_1: float = 1.0, tuner_2: str | None = None, scale_2: float = 1.0,
        tuner_3: str | None = None, scale_3: float = 1.0, conditional_only: bool = False, texture: bool = False, progress=gr.Progress(),
    ) -> tuple[list[str], str, int]:
        """Generate images; returns the PNG files (settings in their metadata), a summary and the seed used."""
        request = request_from_form(
            prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, batch_size=whole_number("batch size", batch_size),
            sc_tuners=tuner_uses(state, [tuner_1, tuner_2, tuner_3], [scale_1, scale_2, scale_3], conditional_only, texture),
        )
        paths, summary = generate_images(state, request, progress)
        return paths, summary, request.seed

    form = SettingsForm(prompt, negative, seed, steps, guidance, width, height, scheduler)  # laid out here with the seed buttons
    slot_inputs = [component for pair in zip(tuners, scales) for component in pair]
    inputs = [*form.inputs, batch, *slot_inputs, conditional_only, texture]
    gr.on([button.click, prompt.submit], on_gpu(generate), inputs, [gallery, info, last_seed], api_name="generate", concurrency_id=GPU_QUEUE)

    def remember_selection(event: gr.SelectData) -> int:
        return event.index

    gallery.select(remember_selection, None, selected, api_name="select_image", api_visibility="private", queue=False)
    gallery.change(lambda: None, None, selected, api_name="clear_selection", api_visibility="private", queue=False)
    random_seed.click(lambda: -1, None, seed, api_name="random_seed", api_visibility="private", queue=False)
    reuse_seed.click(lambda last: -1 if last is None else last, last_seed, seed, api_name="reuse_seed", api_visibility="private", queue=False)

    @user_errors
    def read_png(png: str | None) -> tuple:
        """Settings (prompt, seed, steps, size, scheduler, tuners) stored in a PNG made by this app."""
        return settings_from_png(state, png)

    @user_errors
    def take_tuner_defaults(name: str | None) -> tuple:
        """Picking a tuner sets its scale and the style- and texture-guidance boxes to what its file asks for."""
        if not name:
            return gr.update(), gr.update(), gr.update()
        use = TunerUse.of_file(state.library.find(name))
        return use.scale, use.conditional_only, use.texture

    for i, (tuner, scale) in enumerate(zip(tuners, scales)):  # `input`: the user's own picks, not a PNG's settings read back
        tuner.input(take_tuner_defaults, tuner, [scale, conditional_only, texture], api_name=f"tuner_defaults_{i + 1}",
                    api_visibility="private", queue=False)

    png.upload(read_png, png, [*form.inputs, *slot_inputs, conditional_only, texture], api_name="read_png_settings")
    return GenerateTab(width, height, tuners, scales, conditional_only, texture, gallery, selected, send_to_control, send_to_skip_tuning)
