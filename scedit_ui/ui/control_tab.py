"""Control tab: condition images from a picture, CSC tuners with α and step ranges, interpolation, in/outpainting."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from scedit_ui import conditions, use_cases
from scedit_ui.conditions import CONDITION_KINDS, FIT_MODES, ParamSpec
from scedit_ui.request import GenerationRequest
from scedit_ui.shapes.world import COLORS, SHAPES, caption, sample_scene
from scedit_ui.ui.generate_tab import SettingsForm, describe_result, request_from_form, settings_form
from scedit_ui.ui.handlers import GPU_QUEUE, on_gpu, optional_keywords, readable_upload, user_errors, whole_number
from scedit_ui.ui.state import AppState
from scedit_ui.use_cases import ConditionRow
from tuners import SKIP_WEIGHT_PRESETS, skip_weight_preset
from tuners.composition import ALPHA_MODES, COMPOSED_ALPHA_CAP, DEFAULT_ALPHA_MODE, EDGE_CONDITION_END
from tuners.validation import UserInputError

KINDS = tuple(CONDITION_KINDS)
ROW_FIELDS = ("tuner", "alpha", "start", "end")
ALPHA_MODE_LABELS = {
    "staged": f"Staged: α as set; an edge condition beside colour ends at {EDGE_CONDITION_END:g} of the steps (measured: both follow best)",
    "cap": f"Cap: two or more are scaled down to sum to at most {COMPOSED_ALPHA_CAP:g}",
    "normalise": "Normalise: Σα = 1 (the paper)",
    "raw": "Raw: as set (SCEPTER's code)",
}


@dataclass
class ControlTab:
    """What other tabs wire to."""

    picture: gr.Image
    kinds: gr.CheckboxGroup
    settings: SettingsForm
    tuners: dict[str, gr.Dropdown]  # the CSC tuner of each condition row


# -- plain functions -----------------------------------------------------------------------------


def mask_from_editor(value: dict | Image.Image | None) -> Image.Image | None:
    """The painted area of a mask editor as an "L" mask (255 = generate), or None when nothing is painted."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return conditions.mask_from_image(value)
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").getchannel("A")) > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def region_mask(value: dict | None, picture: Image.Image | None) -> Image.Image | None:
    """A condition's spatial α map from its region editor: the painted area, or an uploaded mask (a background
    that is not the control picture); None applies the condition everywhere."""
    painted = mask_from_editor(value)
    if painted is not None or not isinstance(value, dict) or value.get("background") is None:
        return painted
    background = value["background"].convert("RGB")
    if picture is not None and background.size == picture.size and np.array_equal(np.asarray(background), np.asarray(picture.convert("RGB"))):
        return None  # the picture itself, shown to paint on, with nothing painted
    return conditions.mask_from_image(background)


def fit_mask(mask: Image.Image | None, size: tuple[int, int], fit: str) -> Image.Image | None:
    """A mask drawn over the picture, brought to the generation size the way the picture is (crop, resize or pad)."""
    if mask is None:
        return None
    fitted, box = conditions.fit_image(mask.convert("L"), size, fit, resample=Image.Resampling.BILINEAR)
    canvas = Image.new("L", size, 0)
    canvas.paste(fitted, box[:2])
    return canvas


def builtin_model_notice(state: AppState, picture: str | None) -> str:
    """One line when the built-in tiny model meets a picture of its own (not a shipped Shapes example)."""
    if picture is None or state.manager.source is None or state.manager.source.kind != "builtin":
        return ""
    if Path(picture).name in {Path(example).name for example in example_pictures(state)}:
        return ""
    return (
        f"**Note:** the built-in tiny model draws only Shapes-world scenes ({', '.join(SHAPES)} in {len(COLORS)} colours on plain "
        "backgrounds, 128 px), so a photo's edges and colours come out as such shapes. For photos, load a real Stable Diffusion "
        "model in the Model tab (a diffusers folder, a .safetensors file or a hub id)."
    )


def load_picture(path: str | None) -> Image.Image | None:
    """An uploaded picture as RGB (None when there is none); unreadable or huge files are refused."""
    return conditions.load_image(path, name=Path(path).name) if path else None


def _stage_progress(progress) -> Callable[[int, int, str], None] | None:
    """A Gradio progress as the (done, total, what) callback of the use cases."""
    return None if progress is None else lambda done, total, what: progress((done, total), desc=what)


def interpolation_gallery(state: AppState, request: GenerationRequest, count: int, progress=None) -> list[tuple[str, str]]:
    """The interpolation strip, saved to the outputs folder, as gallery (path, caption) pairs."""
    step = None if progress is None else lambda done, total: progress((done, total), desc="interpolating", unit="steps")
    strip = use_cases.interpolation_strip(state.manager.generate, request, count, step)
    return [(state.save_outputs(result.images, f"blend{blend:.2f}")[0], f"blend {blend:.2f}") for blend, result in strip]


def example_pictures(state: AppState) -> list[str]:
    """The example pictures shipped in assets/examples (Shapes-world scenes named scene-SEED.png)."""
    return sorted(str(p.resolve()) for p in (state.assets_dir / "examples").glob("*.png"))


def _example_prompt(path: str) -> str:
    stem = Path(path).stem
    seed = int(stem.split("-")[1]) if stem.startswith("scene-") else None
    return caption(sample_scene(seed)) if seed is not None else ""


# -- the tab -------------------------------------------------------------------------------------


def _param_control(kind: str, spec: ParamSpec) -> gr.components.Component:
    label = f"{spec.name.replace('_', ' ')}"
    if spec.type == "mask":
        return readable_upload(gr.ImageEditor(
            label="Mask: paint the area to regenerate (empty: random mask)", type="pil", sources=["upload"], layers=False,
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), transforms=(), height=320,
        ), "mask")
    if spec.type == "bool":
        return gr.Checkbox(value=spec.default, label=label, info=spec.help)
    if spec.type == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label, info=spec.help)
    if kind == "inpaint" and spec.name == "seed":
        return gr.Number(value=spec.default, precision=0, minimum=0, maximum=spec.maximum, label="random mask seed", info=spec.help)
    step = 1 if spec.type == "int" else (spec.maximum - spec.minimum) / 100
    return gr.Slider(spec.minimum, spec.maximum, value=spec.default, step=step, label=label, info=spec.help)


def build(state: AppState) -> ControlTab:
    native = state.manager.native_size
    with gr.Row():
        with gr.Column(scale=2):
            picture = readable_upload(gr.Image(
                label="Picture", type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png", height=300,
                elem_id="control-picture",
            ), "picture")
            with gr.Accordion("Draw a picture instead", open=False):
                sketch = gr.Sketchpad(label="Drawing", type="pil", canvas_size=(512, 512))
                use_drawing = gr.Button("Use the drawing as the picture", size="sm")
            kinds = gr.CheckboxGroup(list(KINDS), value=["canny"], label="Condition types", elem_id="control-kinds")
            fit = gr.Radio(list(FIT_MODES), value="crop", label="Fit the picture to the size")
            extract_button = gr.Button("Extract conditions", elem_id="extract-button")
        with gr.Column(scale=3):
            form = settings_form("control", native)
            prompt, negative, seed, steps, guidance, width, height, scheduler = form.inputs
            alpha_mode = gr.Radio(
                [(ALPHA_MODE_LABELS[mode], mode) for mode in ALPHA_MODES], value=DEFAULT_ALPHA_MODE,
                label="How several conditions combine", elem_id="control-alpha-mode",
            )
            generate_button = gr.Button("Generate with conditions", variant="primary", elem_id="control-generate-button")
            gallery = gr.Gallery(label="Results", format="png", columns=2, height=300, object_fit="contain", interactive=False, elem_id="control-gallery")
            info = gr.Markdown()

    groups, previews, params, settings = {}, {}, {}, {}
    for kind in KINDS:
        spec = CONDITION_KINDS[kind]
        with gr.Group(visible=kind == "canny") as groups[kind]:
            gr.Markdown(f"**{kind}** — {spec.description}")
            with gr.Row():
                previews[kind] = gr.Image(label=f"{kind} condition", interactive=False, format="png", height=220, elem_id=f"preview-{kind}")
                with gr.Column():
                    for param in spec.params:
                        params[f"{kind}_{param.name}"] = _param_control(kind, param)
                with gr.Column():
                    settings[f"{kind}_tuner"] = gr.Dropdown(state.tuner_names("csc", kind), value=state.default_tuner(kind), label="CSC tuner", allow_custom_value=True)
                    settings[f"{kind}_alpha"] = gr.Slider(0, 2, value=1.0, step=0.05, label="α")
                    settings[f"{kind}_start"] = gr.Slider(0, 1, value=0.0, step=0.05, label="active from (fraction of steps)")
                    settings[f"{kind}_end"] = gr.Slider(0, 1, value=1.0, step=0.05, label="active until")
                    settings[f"{kind}_skips"] = gr.Dropdown(list(SKIP_WEIGHT_PRESETS), value="all skips", label="skips (per-skip α)",
                                                            info="outer: full-resolution skips (fine detail); inner: the coarser ones (layout)")
            with gr.Accordion(f"{kind}: region (spatial α map)", open=False):
                settings[f"{kind}_region"] = readable_upload(gr.ImageEditor(
                    label="Paint where this condition applies, or upload a mask (white = full α); empty: everywhere", type="pil",
                    sources=["upload"], layers=False, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), transforms=(), height=260,
                ), f"{kind} region")

    with gr.Accordion("Interpolate between two pictures (paper Fig. 9b)", open=False):
        with gr.Row():
            second_picture = readable_upload(gr.Image(
                label="Second picture", type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png", height=220,
            ), "second picture")
            with gr.Column():
                blend = gr.Slider(0, 1, value=0.5, step=0.05, label="Blend towards the second picture (used by Generate)")
                strip_length = gr.Slider(2, 8, value=4, step=1, label="Images in the strip")
                interpolate_button = gr.Button("Generate the strip")
        strip = gr.Gallery(label="Interpolation strip", format="png", columns=8, rows=1, height=200, object_fit="contain", interactive=False)

    examples = example_pictures(state)
    gr.Examples([[path, _example_prompt(path)] for path in examples], inputs=[picture, prompt], label="Example pictures")

    def rows_from(
        kinds: list[str] | None, values: dict[str, Any], picture: Image.Image | None = None, size: tuple[int, int] = (0, 0), fit: str = "crop",
    ) -> list[ConditionRow]:
        rows = []
        for kind in kinds or []:
            if kind not in CONDITION_KINDS:
                raise UserInputError(f"unknown condition type {kind!r}; choose from {', '.join(KINDS)}")
            raw = {p.name: values.get(f"{kind}_{p.name}", p.default) for p in CONDITION_KINDS[kind].params}
            if "mask" in raw:
                raw["mask"] = mask_from_editor(raw["mask"])
            if kind == "inpaint":
                raw["seed"] = whole_number("random mask seed", raw["seed"])
            tuner = values.get(f"{kind}_tuner")
            preset = values.get(f"{kind}_skips") or "all skips"  # Gradio refuses values outside the presets
            rows.append(ConditionRow(
                kind, raw, state.library.find(tuner) if tuner else None, values.get(f"{kind}_alpha", 1.0),
                (float(values.get(f"{kind}_start", 0.0)), float(values.get(f"{kind}_end", 1.0))),
                mask=fit_mask(region_mask(values.get(f"{kind}_region"), picture), size, fit),
                skip_weights=None if preset == "all skips" else skip_weight_preset(state.manager.editor.layout, preset),
            ))
        return rows

    def preview_outputs(extracted: dict[str, Image.Image]) -> list:
        return [extracted.get(kind) for kind in KINDS]

    @user_errors
    def extract(picture: str | None, condition_types: list[str], fit: str, width: int, height: int, progress=gr.Progress(), **row_values) -> list:
        """Extract the condition image of every chosen type (one output per type, empty for the others)."""
        size = (whole_number("width", width), whole_number("height", height))
        return preview_outputs(use_cases.extract_conditions(load_picture(picture), rows_from(condition_types, row_values), size, fit, _stage_progress(progress)))

    def re_extract(picture, condition_types, fit, width, height, **row_values) -> list:
        if picture is None or not condition_types:
            return [gr.skip()] * len(KINDS)
        return extract(picture, condition_types, fit, width, height, None, **row_values)

    @user_errors
    def generate(
        picture: str | None, condition_types: list[str], fit: str, prompt: str, negative_prompt: str, seed: int, steps: int,
        guidance: float, width: int, height: int, scheduler: str, alpha_mode: str, second_picture: str | None = None,
        blend: float = 0.0, progress=gr.Progress(), **row_values,
    ) -> list:
        """Generate with one CSC tuner per chosen condition; returns the images, a summary and every condition image."""
        base = request_from_form(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler)
        image = load_picture(picture)
        rows = rows_from(condition_types, row_values, image, (base.width, base.height), fit)
        request, extracted = use_cases.with_controls(base, image, rows, fit, alpha_mode, load_picture(second_picture), blend, _stage_progress(progress))
        result = state.manager.generate(request, progress=lambda s, n: progress((s, n), desc="denoising", unit="steps"))
        paths = state.save_outputs(result.images, f"control-seed{request.seed}")
        return [paths, describe_result(request, result.seconds, result.notices), *preview_outputs(extracted)]

    @user_errors
    def interpolate(
        picture: str | None, condition_types: list[str], fit: str, prompt: str, negative_prompt: str, seed: int, steps: int,
        guidance: float, width: int, height: int, scheduler: str, alpha_mode: str, second_picture: str | None = None,
        strip_length: int = 4, progress=gr.Progress(), **row_values,
    ) -> list[tuple[str, str]]:
        """A strip of images (same seed) whose condition features blend from the first to the second picture."""
        base = request_from_form(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler)
        if second_picture is None:
            raise UserInputError("add a second picture to interpolate towards")
        image = load_picture(picture)
        rows = rows_from(condition_types, row_values, image, (base.width, base.height), fit)
        request, _ = use_cases.with_controls(base, image, rows, fit, alpha_mode, load_picture(second_picture))
        return interpolation_gallery(state, request, whole_number("images in the strip", strip_length), progress)

    param_inputs = dict(params)
    all_inputs = {**params, **settings}
    preview_list = [previews[kind] for kind in KINDS]
    extract_inputs = [picture, kinds, fit, width, height]
    extract_button.click(optional_keywords(extract, param_inputs), extract_inputs, preview_list, inputs_kwargs=param_inputs,
                         api_name="extract_conditions", concurrency_id="extract")
    automatic = [c.release if isinstance(c, gr.Slider) else c.change for c in params.values() if not isinstance(c, gr.ImageEditor)]
    gr.on(automatic + [fit.change], re_extract, extract_inputs, preview_list, inputs_kwargs=param_inputs,
          api_name="re_extract_conditions", api_visibility="private", concurrency_id="extract", trigger_mode="always_last", show_progress="minimal")

    shared = [picture, kinds, fit, prompt, negative, seed, steps, guidance, width, height, scheduler, alpha_mode, second_picture]
    generate_button.click(optional_keywords(on_gpu(generate), all_inputs), [*shared, blend], [gallery, info, *preview_list],
                          inputs_kwargs=all_inputs, api_name="control_generate", concurrency_id=GPU_QUEUE)
    interpolate_button.click(optional_keywords(on_gpu(interpolate), all_inputs), [*shared, strip_length], strip,
                             inputs_kwargs=all_inputs, api_name="control_interpolate", concurrency_id=GPU_QUEUE)

    kinds.change(lambda chosen: [gr.Group(visible=kind in (chosen or [])) for kind in KINDS], kinds, [groups[k] for k in KINDS],
                 api_name="show_condition_rows", api_visibility="private", queue=False)
    use_drawing.click(lambda drawing: drawing["composite"] if drawing else None, sketch, picture, api_name="use_drawing", api_visibility="private")
    mask_editor = params["inpaint_mask"]

    @user_errors
    def to_mask_editor(picture: str | None) -> dict | None:
        image = load_picture(picture)
        return {"background": image, "layers": [], "composite": image} if image is not None else None

    region_editors = [settings[f"{kind}_region"] for kind in KINDS]
    picture.change(lambda p: [to_mask_editor(p)] * (1 + len(region_editors)), picture, [mask_editor, *region_editors],
                   api_name="picture_to_mask_editor", api_visibility="private")
    picture.upload(lambda p: builtin_model_notice(state, p), picture, info, api_name="builtin_model_notice", api_visibility="private", queue=False)
    return ControlTab(picture, kinds, form, {kind: settings[f"{kind}_tuner"] for kind in KINDS})
