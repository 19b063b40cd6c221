"""The one shared model manager: loads a base pipeline, owns its `SkipEditor`, generates images.

The UI, the CLI and the tests all go through `ModelManager.load` and `ModelManager.generate`.
One lock serialises every use of the pipeline, so concurrent requests never interleave.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import SingleFileComponentError
from PIL import Image
from safetensors import safe_open

from scedit_ui.conditions import normalize_image
from scedit_ui.hub import hub_offline
from scedit_ui.request import FREEU_PRESETS, GenerationRequest, attach_metadata
from tuners import ControlCondition, SkipEditor, SkipScaling, TunerFileError, load_tuner
from tuners.composition import COMPOSED_ALPHA_CAP
from tuners.io import Tuner
from tuners.layout import LayoutMismatchError
from tuners.reference_configs import guess_architecture
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODEL = ASSETS / "tiny-sd"
BUILTIN_NAMES = ("", "tiny", "tiny-sd", "builtin")

ProgressCallback = Callable[[int, int], None]


class GenerationCancelled(Exception):
    """The caller asked to stop; the pipeline lock is released on the way out."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "builtin" | "folder" | "single_file" | "hub"
    location: str

    @property
    def display_name(self) -> str:
        return "tiny-sd (built-in)" if self.kind == "builtin" else self.location


def resolve_source(name: str | None, builtin: Path = BUILTIN_MODEL) -> ModelSource:
    """Decide what `name` refers to, or explain what was tried and how to fix it."""
    name = (name or "").strip()
    if name.lower() in BUILTIN_NAMES:
        if not (builtin / "model_index.json").is_file():
            raise UserInputError(f"the built-in model is missing: no model_index.json in {builtin}; reinstall the project files")
        return ModelSource("builtin", str(builtin))
    path = Path(name).expanduser()
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL character
        pass  # not a local file: perhaps a hub id
    except OSError as error:  # a name too long for a path, a folder without permission, ...
        raise UserInputError(f"model {name[:80]!r} cannot be looked up as a local path: {error.strerror}") from None
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"{path} is a folder but not a diffusers pipeline (no model_index.json); point at the folder that has one")
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserInputError(f"{path.name}: only .safetensors single-file checkpoints are loaded (pickled .ckpt files can run code); convert it first")
        return ModelSource("single_file", str(path))
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name
    if not looks_like_repo:
        raise UserInputError(f"model {name!r} not found: it is not an existing folder or .safetensors file, nor a hub id like 'owner/name'")
    if hub_offline():
        raise UserInputError(
            f"model {name!r} is not a local folder or file, and the hub is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
            "download it on a connected machine and pass its folder with --model"
        )
    return ModelSource("hub", name)


def load_pipeline(source: ModelSource, dtype: torch.dtype, single_file_config: str | None = None) -> DiffusionPipeline:
    """The Stable Diffusion (1.x/2.x) or SDXL pipeline at `source`; failures become one actionable message."""
    try:
        if source.kind == "single_file":
            pipeline_class = StableDiffusionXLPipeline if _is_sdxl_checkpoint(source.location) else StableDiffusionPipeline
            pipeline = pipeline_class.from_single_file(source.location, config=single_file_config, dtype=dtype)
        else:
            pipeline = DiffusionPipeline.from_pretrained(source.location, dtype=dtype)
    except (OSError, ValueError, SingleFileComponentError) as error:
        raise UserInputError(_load_failure_message(source, error)) from error
    if not isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise UserInputError(f"{source.display_name} is a {type(pipeline).__name__}; only Stable Diffusion 1.x/2.x and SDXL pipelines are supported")
    return pipeline


def pick_device(requested: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA fp16 on a GPU, MPS where present, else CPU fp32."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if requested not in ("cuda", "mps", "cpu"):
        raise UserInputError(f"unknown device {requested!r}; choose auto, cuda, mps or cpu")
    return torch.device(requested), torch.float16 if requested in ("cuda", "mps") else torch.float32


def _scheduler_for(name: str, config: dict):
    if name == "DDIM":
        return DDIMScheduler.from_config(config)
    if name == "DPM++ 2M":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "DPM++ 2M Karras":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    return EulerAncestralDiscreteScheduler.from_config(config)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seconds: float
    notices: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    name: str
    family: str  # "tiny" | "sd15" | "sd21" | "sdxl" | "custom"
    device: str
    dtype: str
    native_size: int
    num_skips: int
    skip_channels: tuple[int, ...]


class ModelManager:
    """One base pipeline at a time, its `SkipEditor`, and a cache of loaded tuner files."""

    def __init__(self, device: str = "auto") -> None:
        self.device, self.dtype = pick_device(device)
        self.lock = threading.Lock()
        self.pipeline: DiffusionPipeline | None = None
        self.editor: SkipEditor | None = None
        self.source: ModelSource | None = None
        self.family = ""
        self._scheduler_config: dict = {}
        self._tuners: dict[tuple[str, float], Tuner] = {}

    # -- loading ---------------------------------------------------------------------------------
    def load(self, name: str | None = None, single_file_config: str | None = None) -> ModelInfo:
        """Load a base model (built-in tiny model when `name` is empty) and attach a fresh editor."""
        source = resolve_source(name)
        with self.lock:
            started = time.perf_counter()
            pipeline = load_pipeline(source, self.dtype, single_file_config)
            pipeline.set_progress_bar_config(disable=True)
            if self.editor is not None:
                self.editor.detach()
            self.pipeline, self.source = pipeline.to(self.device), source
            self.family = "tiny" if source.kind == "builtin" else "sdxl" if isinstance(pipeline, StableDiffusionXLPipeline) else guess_architecture(pipeline.unet.config)
            self._scheduler_config = dict(pipeline.scheduler.config)
            self.editor = SkipEditor(pipeline.unet, pipeline.vae_scale_factor).attach()
            self._tuners.clear()
            logger.info("loaded %s (%s) in %.1f s", source.display_name, self.family, time.perf_counter() - started)
            return self.info()

    def info(self) -> ModelInfo:
        self._require_pipeline()
        layout = self.editor.layout
        return ModelInfo(
            name=self.source.display_name,
            family=self.family,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            native_size=self.native_size,
            num_skips=layout.num_skips,
            skip_channels=layout.channels,
        )

    @property
    def native_size(self) -> int:
        pipeline = self._require_pipeline()
        return pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    def set_memory_options(self, attention_slicing: bool = False, vae_tiling: bool = False) -> None:
        pipeline = self._require_pipeline()
        with self.lock:
            pipeline.enable_attention_slicing() if attention_slicing else pipeline.disable_attention_slicing()
            pipeline.vae.enable_tiling() if vae_tiling else pipeline.vae.disable_tiling()

    def _require_pipeline(self) -> DiffusionPipeline:
        if self.pipeline is None:
            raise UserInputError("no base model is loaded yet; load one first")
        return self.pipeline

    # -- tuners ----------------------------------------------------------------------------------
    def tuner(self, path: str | Path) -> Tuner:
        """A tuner file loaded for the current UNet (cached until the file or the model changes)."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"tuner file not found: {path}")
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._tuners:
            try:
                tuner, _ = load_tuner(path, self.editor.layout, self.dtype)
            except (TunerFileError, LayoutMismatchError) as error:
                raise UserInputError(str(error)) from error
            self._tuners[key] = tuner.to(self.device).eval()
        return self._tuners[key]

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Validate (before any work), apply the request's edits, run the pipeline, return tagged PNGs."""
        pipeline = self._require_pipeline()
        request = request.validated(self.native_size, self.editor.layout.num_skips)
        with self.lock:
            started = time.perf_counter()
            try:
                self._apply_edits(request)
                notices = self._notices(request)
                images = self._run_pipeline(request, progress, cancel)
            except torch.cuda.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                raise UserInputError("out of GPU memory: lower the image size or the batch size, or turn on attention slicing / VAE tiling") from error
            finally:
                self.editor.clear()
                pipeline.disable_freeu()
            seconds = time.perf_counter() - started
        name = self.source.display_name
        tagged = [attach_metadata(image, request, i, request.seed + i, name) for i, image in enumerate(images)]
        return GenerationResult(tagged, seconds, notices)

    def _notices(self, request: GenerationRequest) -> list[str]:
        """What the user should know about how the request is read (once its edits are applied): a truncated prompt,
        α scaled by the cap, an edge condition ended early by the staged mode."""
        tokenizer = self.pipeline.tokenizer
        notices = []
        for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            length = len(tokenizer(text).input_ids)
            if length > tokenizer.model_max_length:
                notices.append(f"the {label} is {length} tokens long; only the first {tokenizer.model_max_length} are used")
        alphas, applied = [use.alpha for use in request.conditions], self.editor.applied_alphas
        if request.alpha_mode == "cap" and applied != alphas:
            notices.append(
                f"the conditions' α {', '.join(f'{a:g}' for a in alphas)} are applied as {', '.join(f'{a:.3g}' for a in applied)}: "
                f"together they are capped at Σα = {COMPOSED_ALPHA_CAP:g} (at full α each they overshoot); "
                "choose the α mode 'raw' to apply them as set"
            )
        for use, condition, (_, end) in zip(request.conditions, self.editor.conditions, self.editor.applied_step_ranges):
            if end != use.step_range[1]:
                notices.append(
                    f"{Path(use.tuner).name} ({condition.tuner.condition_type}) ends at {end:g} of the steps instead of "
                    f"{use.step_range[1]:g}: beside a condition that "
                    "sets the colours, an edge condition lets go for the last steps (measured: both follow better); "
                    "choose the α mode 'raw' to keep it to the end"
                )
        for notice in notices:
            logger.warning(notice)
        return notices

    def _apply_edits(self, request: GenerationRequest) -> None:
        editor = self.editor
        for use in request.sc_tuners:
            editor.add_sc_tuner(use.tuner, self.tuner(use.tuner), use.scale, use.conditional_only, use.texture)
        size = (request.width, request.height)
        conditions = [
            ControlCondition(
                tuner=self.tuner(use.tuner),
                image=image_to_tensor(use.image, size),
                alpha=use.alpha,
                step_range=use.step_range,
                blend_image=image_to_tensor(use.blend_image, size) if use.blend_image is not None else None,
                blend=use.blend,
                mask=mask_to_tensor(use.mask, size) if use.mask is not None else None,
                skip_weights=use.skip_weights,
            )
            for use in request.conditions
        ]
        editor.set_conditions(conditions, request.alpha_mode)
        if request.skip_tuning is not None:
            st = request.skip_tuning
            editor.set_skip_scaling(SkipScaling.linear(editor.layout.num_skips, st.rho_outer, st.rho_inner, dict(st.overrides), st.step_range))
        if request.freeu is not None:
            self.pipeline.enable_freeu(*request.freeu)

    def _run_pipeline(self, request: GenerationRequest, progress: ProgressCallback | None, cancel: threading.Event | None) -> list[Image.Image]:
        pipeline = self.pipeline
        pipeline.scheduler = _scheduler_for(request.scheduler, self._scheduler_config)

        def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("generation cancelled")
            if progress is not None:
                progress(step + 1, request.steps)
            return self.editor.step_end_callback(pipe, step, timestep, callback_kwargs)

        self.editor.set_step(0, request.steps)  # the schedulers offered make exactly `steps` timesteps
        # diffusers' do_classifier_free_guidance for SD and SDXL: the UNet then sees [unconditional; conditional].
        self.editor.guidance_halves = request.guidance > 1 and pipeline.unet.config.time_cond_proj_dim is None
        self.editor.guidance_scale = request.guidance

        # One CPU generator per image: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.batch_size)]
        output = pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.batch_size,
            generator=generators,
            callback_on_step_end=on_step_end,
        )
        return list(output.images)

    def freeu_preset(self) -> tuple[float, float, float, float]:
        """The diffusers-docs FreeU factors for the loaded family (the tiny model has SD 1.5 blocks)."""
        return FREEU_PRESETS.get(self.family, FREEU_PRESETS["sd15"])


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size as (B, 3, H, W) in [0, 1], as diffusers' image processor makes them."""
    return VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy([image.convert("RGB") for image in images]))


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A condition image as (1, 3, H, W) in [0, 1] at the generation size."""
    image = normalize_image(image)  # 16-bit, CMYK, palette and transparent images as the UI would read them
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return images_to_tensor([image])


def mask_to_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A spatial α map as (1, 1, H, W) in [0, 1] at the generation size (white = 1); colour masks are read as grey."""
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def _is_sdxl_checkpoint(path: str) -> bool:
    with safe_open(path, framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())


def _load_failure_message(source: ModelSource, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fixes = {
        "folder": "check that the folder is a complete diffusers Stable Diffusion pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
        "builtin": "reinstall the project files (assets/tiny-sd)",
        "single_file": "pass --config with a local diffusers folder of the same architecture, or go online so its config can be fetched",
        "hub": "check the repo id and your network, or download it and pass the folder with --model",
    }
    return f"could not load {source.kind.replace('_', ' ')} model {source.location}: {reason}. Fix: {fixes[source.kind]}"
