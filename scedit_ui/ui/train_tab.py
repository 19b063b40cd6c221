"""Train tab: train an SC (style) or CSC (condition) tuner in a background thread; a timer polls its progress."""
from __future__ import annotations

import html
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from scedit_ui.shapes.world import STYLES
from scedit_ui.training import (
    CHECKPOINT_NAME,
    TRAINABLE_CONDITIONS,
    TrainingConfig,
    TrainingProgress,
    TrainingResult,
    duration,
    load_training_data,
    train_tuner,
)
from scedit_ui.training.calibration import describe_default
from scedit_ui.ui.handlers import user_errors, whole_number
from scedit_ui.ui.state import AppState
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)

DATA_SOURCES = ("Shapes world", "My images")
PLAIN_SHAPES = "plain (no style)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
POLL_SECONDS = 1.0
DEFAULTS = {f.name: f.default for f in fields(TrainingConfig)}  # what `python -m scedit_ui train` uses when not told


@dataclass
class TrainingJob:
    """One training run in a background thread, and what the tab shows of it."""

    name: str
    config: TrainingConfig
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # a resumed run starts with the earlier runs' curve
    previews: list[tuple[Image.Image, str]] = field(default_factory=list)  # the latest set, captioned with its step
    result: TrainingResult | None = None
    error: str | None = None
    announced: bool = False  # the tab has told the library that the tuner exists
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> TrainingJob:
        self._thread = threading.Thread(target=self._run, name=f"training {self.name}", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _update(self, event: TrainingProgress) -> None:
        with self._lock:
            self.step, self.eta_seconds, self.elapsed_seconds = event.step, event.eta_seconds, event.elapsed_seconds
            if self.losses and self.losses[-1][0] >= event.step:  # resumed from a checkpoint older than the last step shown
                self.losses = [(step, loss) for step, loss in self.losses if step < event.step]
            self.losses.append((event.step, event.loss))
            if event.previews:
                self.previews = [(image, f"step {event.step}") for image in event.previews]

    def _run(self) -> None:
        try:
            self.result = train_tuner(self.config, self._update, self.cancel)
        except UserInputError as error:
            self.error = str(error)
        except Exception as error:  # the thread is the edge: report the failure in the tab, with the traceback in the log
            logger.exception("training %s failed", self.name)
            self.error = f"training failed: {type(error).__name__}: {error}"

    def status(self) -> str:
        if self.error:
            return f"Failed: {self.error}"
        if self.result is not None and self.result.cancelled:
            return f"Cancelled after {self.result.steps} steps; nothing was added to the library yet — Resume continues from the checkpoint"
        if self.result is not None:
            note = describe_default(self.result.metadata) if self.result.metadata else ""
            return (f"Finished {self.name}: {self.result.steps} steps in {self.result.seconds:.0f} s, loss {self.result.loss:.4f} — now in the library"
                    + (f"; {note}" if note else ""))
        if self.cancel.is_set():
            return "Stopping after this step …"
        if self.eta_seconds is None:  # no step of this session yet
            verb = "Resuming" if self.config.resume else "Preparing"
            return f"{verb} {self.name}: loading the data and a copy of the base model …"
        return f"Training {self.name}"


# -- plain functions -----------------------------------------------------------------------------


def collect_uploads(files: list[str], default_caption: str, folder: Path) -> Path:
    """Uploaded images (and their NAME.txt / metadata.jsonl captions) copied into `folder`; images without a
    caption get `default_caption` when one is given."""
    images = [Path(f) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise UserInputError(f"upload the training images ({', '.join(IMAGE_SUFFIXES)}); captions (NAME.txt or metadata.jsonl) are optional")
    folder.mkdir(parents=True, exist_ok=True)
    for file in map(Path, files):
        if file.suffix.lower() in IMAGE_SUFFIXES or file.suffix == ".txt":
            shutil.copyfile(file, folder / file.name)
        elif file.name.endswith(".jsonl"):
            shutil.copyfile(file, folder / "metadata.jsonl")
    caption = (default_caption or "").strip()
    if caption:
        for image in images:
            if not (folder / f"{image.stem}.txt").exists():
                (folder / f"{image.stem}.txt").write_text(caption, encoding="utf-8")
    return folder


def training_config(
    state: AppState, name: str, kind: str, condition: str | None, data: str, trigger: str, remove_words: str, steps: int,
    learning_rate: float, batch_size: int, resolution: int, preview_every: int, seed: int, work_dir: Path,
) -> TrainingConfig:
    """The validated config of a run that trains on the loaded base and writes `name` into the library."""
    out = state.library.path_for(name)
    if out.exists():
        raise UserInputError(f"a tuner named {out.stem!r} already exists; choose another name or delete it in the Tuners tab")
    source = state.manager.source
    steps = whole_number("steps", steps)
    config = TrainingConfig(
        kind=kind, data=data, out=out, condition=condition if kind == "csc" else None, trigger=trigger,
        remove_words=tuple((remove_words or "").split(",")), steps=steps,
        batch_size=whole_number("batch size", batch_size), learning_rate=float(learning_rate),
        resolution=whole_number("resolution", resolution), seed=whole_number("seed", seed),
        checkpoint_every=max(1, steps // 10),  # Cancel keeps the finished steps anyway; this covers a crash
        preview_every=whole_number("preview interval", preview_every), preview_steps=10,
        base_model="" if source is None or source.kind == "builtin" else source.location,
        work_dir=work_dir, device=state.manager.device.type if state.manager.device.type in ("cuda", "cpu") else "auto",
    ).validated()
    load_training_data(config)  # a missing caption or a broken picture is reported now, not from the thread
    return config


def start_training(state: AppState, name: str, config: TrainingConfig) -> TrainingJob:
    """Start `config` in the background, unless another run is still going."""
    if state.training is not None and state.training.running:
        raise UserInputError(f"{state.training.name} is still training; cancel it or wait until it finishes")
    state.training = TrainingJob(name, config).start()
    return state.training


def resume_training(state: AppState, steps: int) -> TrainingJob:
    """Continue the last cancelled or failed run from its checkpoint, up to `steps` in all."""
    job = state.training
    if job is None:
        raise UserInputError("there is no training to resume; start one first")
    if job.running:
        raise UserInputError(f"{job.name} is still training")
    if job.result is not None and not job.result.cancelled:
        raise UserInputError(f"{job.name} has finished and is in the library; start a new training to train more")
    if not (job.config.work / CHECKPOINT_NAME).is_file():
        raise UserInputError(f"{job.name} stopped before its first checkpoint; start it again")
    steps = whole_number("steps", steps)
    if steps <= job.step:
        raise UserInputError(f"{job.name} has done {job.step} steps; set Steps above that to train more")
    config = replace(job.config, resume=True, steps=steps)
    resumed = TrainingJob(job.name, config, step=job.step, losses=list(job.losses), previews=list(job.previews))
    state.training = resumed.start()
    return resumed


def progress_html(job: TrainingJob | None) -> str:
    """A progress bar with step, loss and time left."""
    if job is None:
        return "<div class='train-progress'>no training yet</div>"
    total = job.config.steps
    loss = f" · loss {job.losses[-1][1]:.4f}" if job.losses else ""
    elapsed = f" · {duration(job.elapsed_seconds)} elapsed" if job.elapsed_seconds else ""
    eta = f" · {duration(job.eta_seconds)} left" if job.eta_seconds is not None and job.running else ""
    return (
        f"<div class='train-progress'><progress value='{job.step}' max='{total}' style='width:100%'></progress>"
        f"<div>step {job.step} / {total}{loss}{elapsed}{eta} — {html.escape(job.status())}</div></div>"
    )


def loss_frame(job: TrainingJob | None) -> pd.DataFrame:
    """Loss per step, typed as numbers even when empty (the plot keeps the axis types it first sees)."""
    return pd.DataFrame(job.losses if job else [], columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


# -- the tab -------------------------------------------------------------------------------------


@dataclass
class TrainTab:
    """What other tabs wire to."""

    timer: gr.Timer  # polls the running training; active only while one runs
    resolution: gr.Slider


def build(state: AppState, library_version: gr.State) -> TrainTab:
    with gr.Row():
        with gr.Column(scale=2):
            name = gr.Textbox(label="Tuner name", value="my-style", elem_id="train-name")
            kind = gr.Radio([("SC: a style, from images", "sc"), ("CSC: a condition type", "csc")], value="sc", label="Kind")
            condition = gr.Dropdown(list(TRAINABLE_CONDITIONS), value="canny", label="Condition type", visible=False)
            source = gr.Radio(list(DATA_SOURCES), value="Shapes world", label="Training data")
            style = gr.Dropdown([PLAIN_SHAPES, *STYLES], value="stripes", label="Shapes-world style")
            with gr.Group(visible=False) as upload_group:
                files = gr.File(label="10–30 images; captions optional (NAME.txt or a metadata.jsonl)", file_count="multiple", type="filepath",
                                file_types=["image", ".txt", ".jsonl"])
                default_caption = gr.Textbox(label="Caption for images without one")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", value="<sce>")
                remove_words = gr.Textbox(label="Remove from captions (comma-separated)", value="in stripes style")
            with gr.Row():
                steps = gr.Slider(1, 5000, value=DEFAULTS["steps"], step=1, label="Steps", elem_id="train-steps")
                learning_rate = gr.Number(value=DEFAULTS["learning_rate"], label="Learning rate", minimum=1e-8, maximum=1.0)
            with gr.Row():
                batch = gr.Slider(1, 64, value=DEFAULTS["batch_size"], step=1, label="Batch", elem_id="train-batch")
                resolution = gr.Slider(64, 1024, value=state.manager.native_size, step=8, label="Resolution")
            with gr.Row():
                preview_every = gr.Slider(0, 1000, value=DEFAULTS["preview_every"], step=1, label="Preview every N steps (0 = never)",
                                          elem_id="train-preview-every")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            with gr.Row():
                start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel_button = gr.Button("Cancel", variant="stop", interactive=False, elem_id="train-cancel")
                resume_button = gr.Button("Resume", interactive=False, elem_id="train-resume")
        with gr.Column(scale=3):
            progress = gr.HTML(progress_html(None), elem_id="train-progress")
            status = gr.Markdown(elem_id="train-status")
            plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Training loss", height=240)
            previews = gr.Gallery(label="Previews (fixed prompts and seeds)", format="png", columns=4, height=240, object_fit="contain", interactive=False, elem_id="train-previews")
    timer = gr.Timer(POLL_SECONDS, active=False)

    @user_errors
    def start(
        name: str, kind: str, condition: str, data_source: str, shapes_style: str, files: list[str] | None, default_caption: str,
        trigger: str, remove_words: str, steps: int, learning_rate: float, batch_size: int, resolution: int, preview_every: int,
        seed: int,
    ) -> tuple:
        """Start training in the background; poll /training_status for progress. The tuner lands in the library when done."""
        if not (name or "").strip():
            raise UserInputError("give the tuner a name")
        run_dir = state.output_dir / "training" / f"{time.strftime('%Y%m%d-%H%M%S')}-{state.library.path_for(name).stem}"
        if data_source == "My images":
            data = str(collect_uploads(files or [], default_caption, run_dir / "data"))
        elif data_source == "Shapes world":
            data = "shapes" if shapes_style in (PLAIN_SHAPES, "", None) else f"shapes:{shapes_style}"
        else:
            raise UserInputError(f"training data must be one of {', '.join(DATA_SOURCES)}, got {data_source!r}")
        config = training_config(state, name, kind, condition, data, trigger, remove_words, steps, learning_rate, batch_size,
                                 resolution, preview_every, seed, run_dir)
        job = start_training(state, state.library.path_for(name).stem, config)
        return job.status(), gr.Timer(active=True), gr.Button(interactive=False), gr.Button(interactive=True), gr.Button(interactive=False)

    @user_errors
    def resume(steps: int) -> tuple:
        """Continue the cancelled (or failed) training from its checkpoint, up to the Steps value."""
        job = resume_training(state, steps)
        return job.status(), gr.Timer(active=True), gr.Button(interactive=False), gr.Button(interactive=True), gr.Button(interactive=False)

    def cancel() -> str:
        """Stop the running training after its current step (nothing is added to the library)."""
        job = state.training
        if job is None or not job.running:
            return "no training is running"
        job.cancel.set()
        return job.status()

    def poll(version: int) -> tuple:
        """Progress of the current training: bar, status, loss curve, previews (and whether it still runs)."""
        job = state.training
        running = job is not None and job.running
        finished = job is not None and not running and job.result is not None and job.result.output is not None
        if finished and not job.announced:
            job.announced = True
            version += 1
        resumable = job is not None and not running and (job.error is not None or (job.result is not None and job.result.cancelled))
        return (
            progress_html(job), job.status() if job else "", loss_frame(job), list(job.previews) if job else [],
            gr.Timer(active=running), gr.Button(interactive=not running), gr.Button(interactive=running),
            gr.Button(interactive=resumable), version,
        )

    def show_choices(kind: str, data_source: str) -> tuple:
        return gr.Dropdown(visible=kind == "csc"), gr.Dropdown(visible=data_source == "Shapes world"), gr.Group(visible=data_source == "My images")

    def style_words(style: str) -> str:
        return "" if style == PLAIN_SHAPES else f"in {style} style"

    start_button.click(
        start, [name, kind, condition, source, style, files, default_caption, trigger, remove_words, steps, learning_rate, batch,
                resolution, preview_every, seed],
        [status, timer, start_button, cancel_button, resume_button], api_name="train_start",
    )
    resume_button.click(resume, steps, [status, timer, start_button, cancel_button, resume_button], api_name="train_resume")
    cancel_button.click(cancel, None, status, api_name="train_cancel", queue=False)
    timer.tick(poll, library_version, [progress, status, plot, previews, timer, start_button, cancel_button, resume_button, library_version],
               api_name="training_status", show_progress="hidden")  # queued: only then does the State change fire
    gr.on([kind.change, source.change], show_choices, [kind, source], [condition, style, upload_group],
          api_name="show_training_choices", api_visibility="private", queue=False)
    style.input(style_words, style, remove_words, api_name="style_remove_words", api_visibility="private", queue=False)
    return TrainTab(timer, resolution)
