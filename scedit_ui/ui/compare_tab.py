"""Compare tab: an X/Y(/Z) grid over tuner scales, α, step ranges, ρ, sampling settings and prompt S/R."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from scedit_ui import conditions, use_cases
from scedit_ui.conditions import CONDITION_KINDS
from scedit_ui.model_manager import GenerationCancelled
from scedit_ui.request import SkipTuningSettings, TunerUse
from scedit_ui.ui.generate_tab import request_from_form, settings_form
from scedit_ui.ui.handlers import GPU_QUEUE, on_gpu, user_errors
from scedit_ui.ui.state import AppState
from scedit_ui.use_cases import GRID_AXES, ConditionRow
from tuners.validation import UserInputError

NO_AXIS = "(none)"
EXAMPLE_VALUES = {
    "SC scale": "0, 0.5, 1", "CSC α": "0, 0.5, 1", "step range": "0-1, 0-0.5, 0.5-1", "ρ inner": "1, 0.8, 0.6",
    "steps": "10, 20", "guidance": "3, 5, 7", "scheduler": "DDIM, Euler a", "seed": "1, 2, 3", "prompt S/R": "red, green, blue",
}


@dataclass
class CompareTab:
    """What other tabs wire to."""

    sc_tuner: gr.Dropdown


# -- plain functions -----------------------------------------------------------------------------


def grid_axes(specs: list[tuple[str | None, str | None]]) -> list[use_cases.GridAxis]:
    """The X, Y, Z axes the user filled in (an axis set to "(none)" is left out; Y may not be empty while Z is set)."""
    axes, skipped = [], None
    for name, (kind, values) in zip("XYZ", specs):
        if not kind or kind == NO_AXIS:
            skipped = skipped or name
            continue
        if skipped is not None:
            raise UserInputError(f"axis {name} is set but axis {skipped} is not; fill the axes in order X, Y, Z")
        axes.append(use_cases.parse_axis(kind, values or ""))
    if not axes:
        raise UserInputError("choose what the X axis varies and give its values")
    return axes


def grid_outputs(state: AppState, result: use_cases.GridResult) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Save the grid and its cells under the output folder; (grid path, gallery of labelled cells, every file)."""
    paths = state.save_outputs([result.grid, *result.images], "grid")
    cells = [(path, " · ".join(labels)) for path, labels in zip(paths[1:], result.labels)]
    return paths[0], cells, paths


# -- the tab -------------------------------------------------------------------------------------


def build(state: AppState) -> CompareTab:
    native = state.manager.native_size
    cancel = threading.Event()
    with gr.Row():
        with gr.Column(scale=2):
            form = settings_form("compare", native)
            prompt, negative, seed, steps, guidance, width, height, scheduler = form.inputs
            with gr.Row():
                sc_tuner = gr.Dropdown(state.tuner_names("sc"), value=None, label="SC tuner (for the SC scale axis)", allow_custom_value=True)
                sc_scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="SC scale")
            with gr.Row():
                picture = gr.Image(label="Control picture (optional)", type="filepath", sources=["upload", "clipboard"], format="png", height=200)
                with gr.Column():
                    kind = gr.Dropdown(list(CONDITION_KINDS), value="canny", label="Condition type")
                    csc_tuner = gr.Dropdown(state.tuner_names("csc", "canny"), value=state.default_tuner("canny"), label="CSC tuner", allow_custom_value=True)
                    alpha = gr.Slider(0, 2, value=1.0, step=0.05, label="α")
            rho_inner = gr.Slider(0, 2, value=1.0, step=0.05, label="Skip-Tuning ρ inner (1 = off; the ρ inner axis replaces it)")
        with gr.Column(scale=3):
            axis_inputs = []
            for name, default_kind in zip("XYZ", ("seed", NO_AXIS, NO_AXIS)):
                with gr.Row():
                    axis_kind = gr.Dropdown([NO_AXIS, *GRID_AXES] if name != "X" else list(GRID_AXES), value=default_kind, label=f"{name} axis", scale=1)
                    axis_values = gr.Textbox(value=EXAMPLE_VALUES["seed"] if name == "X" else "", label=f"{name} values (comma-separated)", scale=2,
                                             placeholder="e.g. 0, 0.5, 1 · step ranges 0-0.5 · prompt S/R: the first value is the text to replace")
                axis_kind.change(lambda k: EXAMPLE_VALUES.get(k, ""), axis_kind, axis_values, api_visibility="private", queue=False)
                axis_inputs += [axis_kind, axis_values]
            with gr.Row():
                run_button = gr.Button("Generate grid", variant="primary", elem_id="compare-run")
                cancel_button = gr.Button("Cancel", elem_id="compare-cancel")
            grid_image = gr.Image(label="Grid", format="png", interactive=False, elem_id="compare-grid")
            cells = gr.Gallery(label="Cells", format="png", columns=4, height="auto", object_fit="contain", interactive=False)
            files = gr.File(label="Grid and cells (PNG with their settings)", file_count="multiple", interactive=False)
            info = gr.Markdown(elem_id="compare-info")

    @user_errors
    def compare(
        prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float, width: int, height: int, scheduler: str,
        sc_tuner: str | None, sc_scale: float, picture: str | None, kind: str, csc_tuner: str | None, alpha: float, rho_inner: float,
        x_axis: str, x_values: str, y_axis: str | None = NO_AXIS, y_values: str = "", z_axis: str | None = NO_AXIS, z_values: str = "",
        progress=gr.Progress(),
    ) -> tuple:
        """An X/Y(/Z) grid: the grid image, every cell with its labels, the PNG files and a summary."""
        axes = grid_axes([(x_axis, x_values), (y_axis, y_values), (z_axis, z_values)])
        request = request_from_form(
            prompt, negative_prompt, seed, steps, guidance, width, height, scheduler,
            sc_tuners=(TunerUse(str(state.library.find(sc_tuner)), float(sc_scale)),) if sc_tuner else (),
            skip_tuning=SkipTuningSettings(rho_inner=float(rho_inner)) if float(rho_inner) != 1.0 else None,
        )
        if picture is not None:
            if kind not in CONDITION_KINDS:
                raise UserInputError(f"unknown condition type {kind!r}; choose from {', '.join(CONDITION_KINDS)}")
            row = ConditionRow(kind, {}, state.library.find(csc_tuner) if csc_tuner else None, float(alpha))
            image = conditions.load_image(picture, name=Path(picture).name)
            request, _ = use_cases.with_controls(request, image, [row])
        use_cases.grid_requests(request, axes)  # a bad grid is refused before the first image
        cancel.clear()
        step = None if progress is None else lambda done, total: progress((done, total), desc="grid", unit="steps")
        try:
            result = use_cases.run_grid(state.manager.generate, request, axes, step, cancel)
        except GenerationCancelled:
            raise UserInputError("grid cancelled") from None
        grid_path, gallery, paths = grid_outputs(state, result)
        summary = " × ".join(f"{name}: {axis.kind} ({len(axis.values)})" for name, axis in zip("XYZ", axes))
        return grid_path, gallery, paths, f"{len(result.images)} images · {summary} · seed {request.seed}"

    inputs = [prompt, negative, seed, steps, guidance, width, height, scheduler, sc_tuner, sc_scale, picture, kind, csc_tuner, alpha,
              rho_inner, *axis_inputs]
    run_button.click(on_gpu(compare), inputs, [grid_image, cells, files, info], api_name="compare_grid", concurrency_id=GPU_QUEUE)
    # Not queued: it must get through while the grid holds the GPU queue.
    cancel_button.click(cancel.set, None, None, api_name="compare_cancel", api_visibility="private", queue=False)
    kind.change(lambda k: gr.Dropdown(choices=state.tuner_names("csc", k), value=state.default_tuner(k)), kind, csc_tuner,
                api_name="compare_tuner_choices", api_visibility="private", queue=False)
    return CompareTab(sc_tuner)
