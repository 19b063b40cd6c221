"""The whole app: seven tabs on one shared state, and the events that cross from one tab to another."""
from __future__ import annotations

import gradio as gr
from PIL import Image

from scedit_ui.conditions import CONDITION_KINDS
from scedit_ui.request import TunerUse, read_png_request
from scedit_ui.ui import compare_tab, control_tab, generate_tab, model_tab, skip_tuning_tab, train_tab, tuners_tab
from scedit_ui.ui.handlers import clear_value_errors, user_errors
from scedit_ui.ui.state import AppState
from tuners.validation import UserInputError

TITLE = "SCEdit Studio"
TAB_IDS = ("generate", "control", "compare", "skip-tuning", "train", "tuners", "model")
INTRO = (
    f"# {TITLE}\n"
    "Edit the skip connections of a Stable Diffusion U-Net: **SC-Tuners** for styles, **CSC-Tuners** for control "
    "(SCEdit, CVPR 2024) and training-free **Skip-Tuning** ρ (ICML 2024)."
)


def build_app(state: AppState) -> gr.Blocks:
    """The Gradio Blocks of the app; `state.manager` must have a base model loaded."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        library_version = gr.State(0)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate = generate_tab.build(state)
            with gr.Tab("Control", id="control"):
                control = control_tab.build(state)
            with gr.Tab("Compare", id="compare"):
                compare = compare_tab.build(state)
            with gr.Tab("Skip-Tuning", id="skip-tuning"):
                skip = skip_tuning_tab.build(state)
            with gr.Tab("Train", id="train"):
                train = train_tab.build(state, library_version)
            with gr.Tab("Tuners", id="tuners"):
                tuners = tuners_tab.build(state, library_version)
            with gr.Tab("Model", id="model"):
                model = model_tab.build(state)
        _wire_send_buttons(generate, control, skip, tabs)
        _wire_tuner_choices(state, demo, library_version, generate, control, compare)
        _wire_tuner_use(state, tuners, generate, control, tabs)
        _wire_model_change(state, model, generate, control, skip, train, library_version)
        # A page opened (or reloaded) while a training runs follows it too.
        demo.load(lambda: gr.Timer(active=state.training is not None and state.training.running), None, train.timer,
                  api_name="follow_training", api_visibility="private", queue=False)
    clear_value_errors(demo)
    return demo


def _form_values(path: str) -> tuple:
    """The `SettingsForm` values stored in a PNG made by this app, with that image's seed."""
    request, index, _ = read_png_request(path)
    return generate_tab.SettingsForm.values(request, index)


def _wire_send_buttons(generate, control, skip, tabs: gr.Tabs) -> None:
    @user_errors
    def to_control(gallery: list | None, selected: int | None) -> tuple:
        """The selected image as the Control picture, with its prompt, seed and settings."""
        path = generate_tab.selected_image(gallery, selected)
        with Image.open(path) as image:
            picture = image.convert("RGB")
        return (picture, *_form_values(path), gr.Tabs(selected="control"))

    @user_errors
    def to_skip_tuning(gallery: list | None, selected: int | None) -> tuple:
        """The selected image's prompt, seed and settings in the Skip-Tuning tab (which keeps its own few steps)."""
        prompt, negative, seed, _, *rest = _form_values(generate_tab.selected_image(gallery, selected))
        return (prompt, negative, seed, *rest, gr.Tabs(selected="skip-tuning"))

    skip_fields = [c for c in skip.settings.inputs if c is not skip.settings.steps]
    generate.send_to_control.click(
        to_control, [generate.gallery, generate.selected], [control.picture, *control.settings.inputs, tabs],
        api_name="send_to_control", api_visibility="private")
    generate.send_to_skip_tuning.click(
        to_skip_tuning, [generate.gallery, generate.selected], [*skip_fields, tabs],
        api_name="send_to_skip_tuning", api_visibility="private")


def _wire_tuner_choices(state: AppState, demo: gr.Blocks, library_version: gr.State, generate, control, compare) -> None:
    """Every tuner dropdown lists the library tuners that fit the loaded base, refreshed when either changes; an empty
    condition row gets the tuner made for its kind."""
    kinds = list(CONDITION_KINDS)
    dropdowns = [*generate.tuners, compare.sc_tuner, *(control.tuners[kind] for kind in kinds)]

    def refresh(*current: str | None) -> list[gr.Dropdown]:
        sc = state.tuner_names("sc")
        choices = [sc] * (len(generate.tuners) + 1) + [state.tuner_names("csc", kind) for kind in kinds]
        defaults = [None] * (len(generate.tuners) + 1) + [state.default_tuner(kind) for kind in kinds]
        return [
            gr.Dropdown(choices=names, value=value if value in names else default)
            for names, value, default in zip(choices, current, defaults)
        ]

    library_version.change(refresh, dropdowns, dropdowns, api_name="refresh_tuner_choices", api_visibility="private", queue=False)
    demo.load(refresh, dropdowns, dropdowns, api_name="refresh_tuner_choices_on_load", api_visibility="private", queue=False)


def _wire_tuner_use(state: AppState, tuners, generate, control, tabs: gr.Tabs) -> None:
    kinds = list(CONDITION_KINDS)
    control_dropdowns = [control.tuners[kind] for kind in kinds]
    outputs = [*generate.tuners, *generate.scales, generate.conditional_only, generate.texture, control.kinds, *control_dropdowns, tuners.status]

    @user_errors
    def load(name: str | None, tuner_1: str | None, tuner_2: str | None, tuner_3: str | None, condition_types: list[str], *rows: str | None) -> list:
        """Put a tuner into use: an SC tuner into a free Generate slot, a CSC tuner into its condition row in Control."""
        if not name:
            raise UserInputError("choose a tuner to load")
        entry = tuners_tab.check_fits(state, name)
        slots, chosen, condition = tuners_tab.with_tuner(entry, [tuner_1, tuner_2, tuner_3], list(condition_types or []))
        rows = [name if kind == condition else value for kind, value in zip(kinds, rows)]
        place = "the Generate tab" if entry.kind == "sc" else f"the {condition} row of the Control tab"
        # An SC tuner put into a slot brings the scale and the way of applying it that its file asks for.
        added = entry.kind == "sc" and name not in (tuner_1, tuner_2, tuner_3)
        use = TunerUse.of_file(entry.path) if added else None
        scales = [use.scale if use and slot == name else gr.update() for slot in slots]
        return [*slots, *scales, *((use.conditional_only, use.texture) if use else (gr.update(), gr.update())), chosen, *rows, f"loaded {name} into {place}"]

    @user_errors
    def unload(name: str | None, tuner_1: str | None, tuner_2: str | None, tuner_3: str | None, condition_types: list[str], *rows: str | None) -> list:
        """Take a tuner out of every Generate slot and Control row."""
        if not name:
            raise UserInputError("choose a tuner to unload")
        slots = [None if value == name else value for value in (tuner_1, tuner_2, tuner_3)]
        freed = {kind for kind, value in zip(kinds, rows) if value == name}
        chosen = [kind for kind in condition_types or [] if kind not in freed]
        keep = [gr.update()] * (len(generate.scales) + 2)  # scales and the style- and texture-guidance boxes stay as they are
        return [*slots, *keep, chosen, *(None if value == name else value for value in rows), f"unloaded {name}"]

    inputs = [tuners.selector, *generate.tuners, control.kinds, *control_dropdowns]
    tuners.load_button.click(load, inputs, outputs, api_name="load_tuner", api_visibility="private", queue=False)
    tuners.unload_button.click(unload, inputs, outputs, api_name="unload_tuner", api_visibility="private", queue=False)


def _wire_model_change(state: AppState, model, generate, control, skip, train, library_version: gr.State) -> None:
    """After another base model is loaded: its native size, its skips and its FreeU preset everywhere."""
    sizes = [generate.width, generate.height, control.settings.width, control.settings.height, skip.settings.width, skip.settings.height,
             train.resolution]

    def follow(version: int) -> list:
        info = state.manager.info()
        rhos = skip_tuning_tab.linear_rhos(info.num_skips, 1.0, 1.0)
        return [
            *[info.native_size] * len(sizes),
            *skip_tuning_tab.rho_slider_updates(state.manager.editor.layout, rhos),
            "model default", *state.manager.freeu_preset(), version + 1,
        ]

    model.load_event.success(
        follow, library_version, [*sizes, *skip.rhos, skip.freeu_preset, *skip.freeu_factors, library_version],
        api_name="follow_model", api_visibility="private")  # queued: only then does the State change fire
