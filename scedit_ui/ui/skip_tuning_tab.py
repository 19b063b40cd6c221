"""Skip-Tuning tab: one ρ per skip connection of the loaded U-Net, FreeU, and a same-seed comparison."""
from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from scedit_ui.request import FREEU_PRESETS, GenerationRequest, SkipTuningSettings
from scedit_ui.ui.generate_tab import SettingsForm, describe_result, example_prompts, request_from_form, settings_form
from scedit_ui.ui.handlers import GPU_QUEUE, on_gpu, user_errors
from scedit_ui.ui.state import AppState
from tuners import SkipLayout, rho_schedule
from tuners.validation import UserInputError, check_number

MAX_SKIPS = 12  # SD 1.5 / 2.1; SDXL has 9
RHO_PRESETS: dict[str, tuple[float, float]] = {  # name: (ρ outer, ρ inner), linear in between
    "off (ρ = 1)": (1.0, 1.0),
    "gentle (1 → 0.9)": (1.0, 0.9),
    "paper (1 → 0.8)": (1.0, 0.8),
    "strong (1 → 0.6)": (1.0, 0.6),
}
FREEU_FACTORS = ("s1", "s2", "b1", "b2")


@dataclass
class SkipTuningTab:
    """What other tabs wire to."""

    settings: SettingsForm
    rhos: list[gr.Slider]
    freeu_preset: gr.Dropdown
    freeu_factors: list[gr.Slider]


# -- plain functions -----------------------------------------------------------------------------


def skip_labels(layout: SkipLayout) -> list[str]:
    """One label per skip: index, channels and resolution relative to the latent."""
    return [f"ρ{g} · {c} ch · 1/{2 ** layout.downsamples_before(g)}" for g, c in enumerate(layout.channels)]


def rho_slider_updates(layout: SkipLayout, rhos: list[float]) -> list[gr.Slider]:
    """The ρ sliders for a model with `layout`: one per skip, the rest hidden."""
    if layout.num_skips > MAX_SKIPS:
        raise UserInputError(f"this U-Net has {layout.num_skips} skips; the Skip-Tuning tab shows at most {MAX_SKIPS}")
    labels = skip_labels(layout)
    return [
        gr.Slider(visible=True, label=labels[g], value=rhos[g]) if g < layout.num_skips else gr.Slider(visible=False, value=1.0)
        for g in range(MAX_SKIPS)
    ]


def linear_rhos(num_skips: int, rho_outer: float, rho_inner: float) -> list[float]:
    """ρ from the linear schedule, rounded to the sliders' resolution."""
    for name, value in (("ρ outer", rho_outer), ("ρ inner", rho_inner)):
        check_number(name, value, 0.0, 4.0)
    return [round(r, 3) for r in rho_schedule(num_skips, float(rho_outer), float(rho_inner))] + [1.0] * (MAX_SKIPS - num_skips)


def freeu_for_preset(state: AppState, preset: str) -> tuple[float, float, float, float]:
    if preset == "model default":
        return state.manager.freeu_preset()
    if preset not in FREEU_PRESETS:
        raise UserInputError(f"unknown FreeU preset {preset!r}; choose one of: model default, {', '.join(FREEU_PRESETS)}")
    return FREEU_PRESETS[preset]


def compare(state: AppState, request: GenerationRequest, rhos: list[float], freeu: tuple[float, ...] | None, progress=None) -> tuple[str, str, str]:
    """The same seed twice: plain (ρ = 1, no FreeU) and with `rhos` (and FreeU); both PNG paths and a summary."""
    num_skips = state.manager.info().num_skips
    if len(rhos) < num_skips:
        raise UserInputError(f"the loaded model has {num_skips} skips; got {len(rhos)} ρ values")
    overrides = tuple((g, float(r)) for g, r in enumerate(rhos[:num_skips]))
    edited_request = replace(request, skip_tuning=SkipTuningSettings(overrides=overrides), freeu=freeu)
    images = []
    for i, run in enumerate((request, edited_request)):

        def step(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress((i * total + done, 2 * total), desc="plain, then edited" if i == 0 else "edited", unit="steps")

        result = state.manager.generate(run, progress=step)
        images.append((result, state.save_outputs(result.images, "plain" if i == 0 else "skip-tuned")[0]))
    (plain, plain_path), (edited, edited_path) = images
    summary = describe_result(request, plain.seconds + edited.seconds, edited.notices)
    rho_text = ", ".join(f"{r:g}" for _, r in overrides)
    freeu_text = f" · FreeU {', '.join(f'{f:g}' for f in freeu)}" if freeu else ""
    return plain_path, edited_path, f"{summary}\n\nρ = [{rho_text}]{freeu_text}"


# -- the tab -------------------------------------------------------------------------------------


def build(state: AppState) -> SkipTuningTab:
    info = state.manager.info()
    layout = state.manager.editor.layout
    with gr.Row():
        with gr.Column(scale=2):
            form = settings_form("skip", info.native_size, seed=0, steps=8, steps_label="Steps (few: where Skip-Tuning helps)")
            prompt, negative, seed, steps, guidance, width, height, scheduler = form.inputs
        with gr.Column(scale=3):
            with gr.Row():
                plain = gr.Image(label="ρ = 1 (plain)", format="png", interactive=False, height=300)
                edited = gr.Image(label="chosen ρ", format="png", interactive=False, height=300, elem_id="skip-edited")
            summary = gr.Markdown()
            compare_button = gr.Button("Compare (same seed)", variant="primary", elem_id="compare-button")

    with gr.Accordion("ρ per skip connection (g = 0 outermost … K−1 innermost)", open=True):
        with gr.Row():
            preset = gr.Dropdown(list(RHO_PRESETS), value="paper (1 → 0.8)", label="Preset")
            rho_outer = gr.Slider(0, 2, value=1.0, step=0.01, label="ρ outer (g = 0)")
            rho_inner = gr.Slider(0, 2, value=0.8, step=0.01, label="ρ inner (g = K−1)")
        initial = linear_rhos(info.num_skips, 1.0, 0.8)
        labels = skip_labels(layout)
        rhos = []
        for row_start in range(0, MAX_SKIPS, 6):
            with gr.Row():
                rhos += [
                    gr.Slider(0, 2, value=initial[g], step=0.01, label=labels[g] if g < len(labels) else f"ρ{g}",
                              visible=g < info.num_skips, min_width=140, elem_id=f"rho-{g}")
                    for g in range(row_start, row_start + 6)
                ]
    with gr.Accordion("FreeU (a related trick: scales backbone and skip features)", open=False):
        with gr.Row():
            use_freeu = gr.Checkbox(False, label="FreeU")
            freeu_preset = gr.Dropdown(["model default", *FREEU_PRESETS], value="model default", label="FreeU preset")
        with gr.Row():
            factors = [gr.Slider(0, 2, value=v, step=0.05, label=name) for name, v in zip(FREEU_FACTORS, state.manager.freeu_preset())]
    gr.Examples([[p] for p in example_prompts()], inputs=[prompt], label="Held-out prompts")

    @user_errors
    def run_comparison(
        prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float, width: int, height: int, scheduler: str,
        use_freeu: bool, s1: float, s2: float, b1: float, b2: float, progress=gr.Progress(), **rho_values: float,
    ) -> tuple[str, str, str]:
        """Plain and Skip-Tuned images with the same seed (ρ0 … ρ11 per skip; extra values are ignored), and a summary."""
        request = request_from_form(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler)
        values = [float(rho_values.get(f"rho_{g}", 1.0)) for g in range(MAX_SKIPS)]
        return compare(state, request, values, (s1, s2, b1, b2) if use_freeu else None, progress)

    @user_errors
    def apply_schedule(rho_outer: float, rho_inner: float) -> list[float]:
        """ρ per skip from the linear schedule between ρ outer and ρ inner."""
        return linear_rhos(state.manager.info().num_skips, rho_outer, rho_inner)

    compare_button.click(
        on_gpu(run_comparison), [prompt, negative, seed, steps, guidance, width, height, scheduler, use_freeu, *factors], [plain, edited, summary],
        inputs_kwargs={f"rho_{g}": slider for g, slider in enumerate(rhos)}, api_name="skip_tuning_compare", concurrency_id=GPU_QUEUE,
    )
    def apply_preset(name: str) -> list[float]:
        outer, inner = RHO_PRESETS[name]
        return [outer, inner, *apply_schedule(outer, inner)]

    preset.input(apply_preset, preset, [rho_outer, rho_inner, *rhos], api_name="rho_preset", api_visibility="private", queue=False)
    gr.on([rho_outer.release, rho_inner.release], apply_schedule, [rho_outer, rho_inner], rhos, api_name="rho_schedule", queue=False)
    freeu_preset.change(user_errors(lambda name: list(freeu_for_preset(state, name))), freeu_preset, factors,
                        api_name="freeu_preset", api_visibility="private", queue=False)
    return SkipTuningTab(form, rhos, freeu_preset, factors)
