"""Training of SC-Tuners (few-shot styles) and CSC-Tuners (one condition type) on a frozen base model.

One loop for both kinds, on CPU or GPU, in one process or many: Hugging Face Accelerate drives every run,
and a single process is simply a world of one, so ``accelerate launch -m scedit_ui train ...`` runs exactly
this code. The UI, the CLI and the tests all call `train_tuner` (or `TunerTrainer`).

Data is a folder of images with captions (``NAME.txt`` next to each image, or a ``metadata.jsonl`` of
``{"file_name": ..., "text": ...}`` lines) or the Shapes world (``"shapes:<style>"`` / ``"shapes"``). It is
validated before any model is loaded; every problem is a `UserInputError` saying what to fix.

Randomness (batch order, noise, timesteps, condition augmentation) is a pure function of (seed, process,
step), so a run resumed from a checkpoint repeats the interrupted one exactly; a checkpoint is the tuner,
the optimizer (and fp16 loss-scaler) state and the step, written atomically.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from scedit_ui.model_manager import images_to_tensor, load_pipeline, resolve_source
from scedit_ui.request import GenerationRequest
from scedit_ui.shapes.checker import score_adherence
from scedit_ui.shapes.world import caption, sample_scene
from scedit_ui.training.calibration import (
    GENERIC_PROMPTS, MAX_COLOUR_DRIFT, MAX_COLOUR_LOSS, CandidateScore, choose_default, score_candidates,
)
from scedit_ui.training.config import ProgressCallback, TrainingConfig, TrainingProgress, TrainingResult
from scedit_ui.training.data import load_training_data, make_condition, prepare_caption
from tuners import (
    ControlCondition, CSCTuner, LayoutMismatchError, SCTuner, SkipEditor, TunerFileError, TunerMetadata, load_tuner, save_tuner,
)
from tuners.io import Tuner, atomic_write
from tuners.reference_configs import guess_architecture
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 16  # condition images that set the scale of a fresh CSC tuner's hint encoder
TEXT_CACHE_SIZE = 4096  # prompt embeddings kept for a stream of Shapes-world captions
CHECKPOINT_NAME = "checkpoint.pt"
PREVIEW_DIR = "previews"
SAMPLING_GUIDANCE = GenerationRequest.guidance  # previews and calibration images: a generation's default guidance
# Images per pipeline call when sampling: on the 2-core CPU a calibration of 4 × 32 images takes 148 s in batches of 8,
# 250 s one at a time and 139 s in 16s (docs/training.md); 8 keeps a 512-px SD batch within a consumer GPU.
SAMPLING_BATCH = 8
# The calibration measures a tuner's default use as a generation makes images: the app's default steps, whatever the
# (Train tab: fewer) preview steps.
CALIBRATION_STEPS = GenerationRequest.steps
CALIBRATION_PROMPTS = 32  # new prompts on which each candidate default of an SC tuner is measured (16 chose by chance)
CALIBRATION_PICTURES = 16  # training pictures whose texture is the reference
CALIBRATION_SEED = 1000  # held-out Shapes scenes not among bench/style_fewshot.py's prompts (seeds 0..31)



class TunedDenoiser(nn.Module):
    """The frozen UNet with the tuner attached through a `SkipEditor`: what Accelerate prepares (and DDP wraps).

    Its forward is one noise prediction; for a CSC tuner the batch's condition images come with it and
    replace the image of `condition`, the one condition the editor holds for the whole run (a new
    `set_conditions` per step would check the layout again for nothing).
    """

    def __init__(self, unet: nn.Module, editor: SkipEditor, tuner: Tuner, condition: ControlCondition | None) -> None:
        super().__init__()
        self.unet = unet
        self.tuner = tuner  # a submodule, so that Accelerate (and DDP) see its parameters
        self.editor = editor
        self.condition = condition

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            self.condition.image = condition
        return self.unet(noisy, timesteps, encoder_hidden_states=text).sample


def make_optimizer(config: TrainingConfig, parameters: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The AdamW `config.optimizer` names, with the run's learning rate and weight decay."""
    if config.optimizer == "adamw-8bit":
        if device.type != "cuda":
            raise UserInputError("8-bit AdamW (bitsandbytes) runs on a CUDA GPU; here use --optimizer adamw or adamw-fused")
        try:
            import bitsandbytes
        except ImportError:
            raise UserInputError("8-bit AdamW needs bitsandbytes: pip install bitsandbytes, or use --optimizer adamw-fused") from None
        return bitsandbytes.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    fused = config.optimizer == "adamw-fused"
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)


class TunerTrainer:
    """One training run: validates the config and data, loads its own copy of the base model, trains, saves.

    Construction does everything that can fail on bad input (nothing is trained yet); `run` trains.
    """

    def __init__(self, config: TrainingConfig) -> None:
        from accelerate import Accelerator

        self.config = config = config.validated()
        self.data = load_training_data(config)
        if config.kind == "csc":  # fails now (missing annotator weights, bad parameters) rather than at step 1
            image = self.data.image(self.data.preview_keys(1)[0], 64)
            make_condition(image, config.condition, dict(config.condition_params), np.random.default_rng(0))
        if config.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        use_cuda = torch.cuda.is_available() and config.device != "cpu"
        self.accelerator = Accelerator(mixed_precision="fp16" if use_cuda else "no", cpu=not use_cuda)
        self.device = self.accelerator.device
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # frozen weights; the tuner stays fp32

        source = resolve_source(config.base_model)
        pipeline = load_pipeline(source, dtype)
        if type(pipeline).__name__ != "StableDiffusionPipeline":
            raise UserInputError(f"training supports Stable Diffusion 1.x/2.x base models; {source.display_name} is {type(pipeline).__name__}")
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(self.device)
        self.base_name = source.display_name
        self.base_architecture = "tiny" if source.kind == "builtin" else guess_architecture(pipeline.unet.config)
        self.resolution = config.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        if self.resolution % pipeline.vae_scale_factor:
            raise UserInputError(f"resolution must be a multiple of {pipeline.vae_scale_factor}, got {self.resolution}")

        from diffusers import DDIMScheduler, DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.preview_scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.editor = SkipEditor(pipeline.unet, pipeline.vae_scale_factor).attach()
        layout = self.editor.layout
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
            torch.manual_seed(config.seed)
            self.tuner: Tuner = (SCTuner(layout, config.down_ratio, config.kernel, config.positions, config.gates) if config.kind == "sc"
                                 else CSCTuner(layout, config.kernel, config.condition))
        self.condition: ControlCondition | None = None  # CSC: the condition whose image each batch sets
        if config.kind == "sc":
            self.editor.add_sc_tuner("training", self.tuner)
        else:
            self.tuner.to(self.device)
            # A resumed run loads its trained weights over this later.
            rng = np.random.default_rng(config.seed)
            pictures = [self.data.image(k, self.resolution) for k in self.data.preview_keys(CALIBRATION_IMAGES)]
            hints = images_to_tensor([make_condition(p, config.condition, dict(config.condition_params), rng) for p in pictures])
            self.tuner.calibrate_hint_encoder(hints.to(self.device))
            placeholder = torch.zeros(1, 3, self.resolution, self.resolution, device=self.device)
            self.condition = ControlCondition(self.tuner, placeholder)
            self.editor.set_conditions([self.condition])
        self.init_training = self._load_init(config.init_from) if config.init_from else None
        if config.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()  # only the decoder records a graph, so only it is checkpointed
        self.parameters = self.editor.train_mode(True)
        optimizer = make_optimizer(config, self.parameters, self.device)
        self.model, self.optimizer = self.accelerator.prepare(TunedDenoiser(pipeline.unet, self.editor, self.tuner, self.condition), optimizer)
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text: dict[str, torch.Tensor] = {}

    def _load_init(self, path: Path) -> dict:
        """Copy the weights of tuner file `path` into the fresh tuner (a checkpoint, when resuming, overrides them
        later); returns the file's training summary for the new file's metadata."""
        if not path.is_file():
            raise UserInputError(f"--init: no tuner file at {path}")
        try:
            initial, metadata = load_tuner(path, self.editor.layout)
        except (TunerFileError, LayoutMismatchError) as error:
            raise UserInputError(f"--init: {error}") from None
        if initial.config != self.tuner.config:
            raise UserInputError(
                f"--init: {path.name} is a {metadata.kind} tuner {initial.config}, but this run trains {self.tuner.config}; "
                "use the same kind, condition, kernel, down ratio, position features and gate (--no-position-features, --no-gated "
                "for a file without them)"
            )
        self.tuner.load_state_dict(initial.state_dict())
        logger.info("starting from the weights of %s", path)
        return {"file": path.name, **metadata.training}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.config.work / CHECKPOINT_NAME

    def _save_checkpoint(self, step: int, loss: float, seconds: float) -> Path:
        # One file written atomically, not Accelerate's save_state: that writes a folder of files in place, so a
        # kill during a save could leave a checkpoint that neither resumes nor can be told apart from a good one.
        state = {
            "step": step,
            "loss": loss,
            "seconds": seconds,  # training time of all sessions so far
            "identity": json.dumps(self.config.identity()),
            "tuner": self.tuner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else {},
        }
        if self.accelerator.is_main_process:
            atomic_write(self.checkpoint_path, lambda temporary: torch.save(state, temporary))
        return self.checkpoint_path

    def _load_checkpoint(self) -> tuple[int, float, float]:
        """(step to start from, its loss, training seconds so far) after restoring the saved state; 0 without one."""
        path = self.checkpoint_path
        if not path.is_file():
            return 0, float("nan"), 0.0
        if not self.config.resume:
            raise UserInputError(
                f"{path} holds the checkpoint of an earlier run; add --resume to continue it, or pass another --work-dir "
                "(or delete that folder) to start over"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = json.loads(state["identity"])
        except (OSError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise UserInputError(f"cannot resume from {path}: {error}. Delete it to start over") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as error:  # not (or no longer) a checkpoint of ours
            raise UserInputError(f"cannot resume from {path}: it is not a checkpoint of this program ({type(error).__name__}). "
                                 "Delete it to start over") from None
        differing = sorted(k for k, v in self.config.identity().items() if saved.get(k) != v)
        if differing:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.config.identity()[k]!r}" for k in differing)
            raise UserInputError(f"cannot resume from {path}: the run differs in {details}. Use the same settings, or another --work-dir")
        self.tuner.load_state_dict(state["tuner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        logger.info("resuming from %s at step %d", path, state["step"])
        return int(state["step"]), float(state["loss"]), float(state.get("seconds", 0.0))

    # -- one step ------------------------------------------------------------------------------------------------
    def _batch_keys(self, step: int, rng: np.random.Generator) -> list[int]:
        """Data keys of this process's share of step `step`: epoch-shuffled indices, or stream seeds."""
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.batch_size
        if self.data.size is None:
            return [int(k) for k in rng.integers(0, 2**48, size=batch)]
        keys = []
        for j in range(batch):
            k = (step * world + rank) * batch + j  # position in the global sample sequence
            epoch, position = divmod(k, self.data.size)
            keys.append(int(np.random.default_rng([self.config.seed, epoch]).permutation(self.data.size)[position]))
        return keys

    @torch.no_grad()
    def _encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        if self.data.size is None and len(self._text) > TEXT_CACHE_SIZE:  # a stream's captions rarely repeat
            self._text.clear()  # before looking up this batch, whose cached captions would go too
        missing = [c for c in dict.fromkeys(captions) if c not in self._text]
        if missing:
            embeddings, _ = self.pipeline.encode_prompt(missing, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            self._text.update(zip(missing, embeddings))
        return torch.stack([self._text[c] for c in captions])

    @torch.no_grad()
    def _encode_images(self, keys: Sequence[int], images: Sequence[Image.Image], generator: torch.Generator) -> torch.Tensor:
        """Latents sampled from the VAE posterior; a finite set's posteriors are computed once and cached."""
        vae = self.pipeline.vae
        cacheable = self.data.size is not None
        todo = [i for i, k in enumerate(keys) if not (cacheable and k in self._latents)]
        fresh = {}
        # A cached image is encoded alone, so its latent does not depend on which batch first met it.
        for chunk in ([[i] for i in todo] if cacheable else [todo] if todo else []):
            pixels = VaeImageProcessor.normalize(images_to_tensor([images[i] for i in chunk]).to(self.device, vae.dtype))
            posterior = vae.encode(pixels).latent_dist
            fresh.update({i: (posterior.mean[n].float(), posterior.std[n].float()) for n, i in enumerate(chunk)})
        if cacheable:
            self._latents.update({keys[i]: v for i, v in fresh.items()})
        stats = [self._latents[k] if cacheable else fresh[i] for i, k in enumerate(keys)]
        mean = torch.stack([m for m, _ in stats])
        std = torch.stack([s for _, s in stats])
        noise = torch.randn(mean.shape, generator=generator).to(self.device)
        return (mean + std * noise) * vae.config.scaling_factor

    def _step(self, step: int) -> float:
        config = self.config
        rng = np.random.default_rng([config.seed, self.accelerator.process_index, step])  # a pure function of the step
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        keys = self._batch_keys(step, rng)
        captions = ["" if rng.random() < config.caption_dropout else self.data.caption(k) for k in keys]
        needs_pixels = config.kind == "csc" or self.data.size is None or any(k not in self._latents for k in keys)
        images = [self.data.image(k, self.resolution) for k in keys] if needs_pixels else []
        latents = self._encode_images(keys, images, generator)
        text = self._encode_text(captions).to(self.pipeline.unet.dtype)
        condition = None
        if config.kind == "csc":
            params = dict(config.condition_params)
            condition = images_to_tensor([make_condition(image, config.condition, params, rng) for image in images]).to(self.device)

        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(keys),), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.pipeline.unet.dtype)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise  # epsilon

        if config.kind == "sc" and config.preserve_base_above < 1.0:
            preserved = timesteps >= round(config.preserve_base_above * self.noise_scheduler.config.num_train_timesteps)
            if preserved.any():
                target = target.clone()
                target[preserved] = self._base_prediction(noisy[preserved], timesteps[preserved], text[preserved]).to(target.dtype)
        prediction = self.model(noisy, timesteps, text, condition)
        loss = F.mse_loss(prediction.float(), target.float())
        self.accelerator.backward(loss)
        if config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss.detach(), "mean"))

    @torch.no_grad()
    def _base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """What the base model alone predicts: the prior-preservation target of an SC tuner."""
        self.editor.remove_sc_tuner("training")
        try:
            return self.pipeline.unet(noisy, timesteps, encoder_hidden_states=text).sample
        finally:
            self.editor.add_sc_tuner("training", self.tuner)

    # -- sampling: previews and the calibrated default -------------------------------------------------------------
    @contextmanager
    def _sampling(self) -> Iterator[Callable[[Sequence[str], Sequence[int], int], list[Image.Image]]]:
        """The training pipeline in inference mode; yields `sample(prompts, seeds, steps)`: one image per (prompt, seed)
        with `steps` DDIM steps, made in batches of SAMPLING_BATCH. Each image's starting noise comes from its own seed, so it is the image
        that prompt and seed give alone."""
        self.editor.train_mode(False)
        self.pipeline.scheduler = self.preview_scheduler
        # Sampling batches stack [unconditional; conditional], as the app's do (ModelManager), so a conditional-only
        # tuner edits the second half; training batches have no halves.
        self.editor.guidance_halves = self.pipeline.unet.config.time_cond_proj_dim is None
        self.editor.guidance_scale = SAMPLING_GUIDANCE

        def sample(prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
            images = []
            for start in range(0, len(prompts), SAMPLING_BATCH):
                self.editor.set_step(0, steps)  # step ranges as the app has them
                images += self.pipeline(
                    prompt=list(prompts[start: start + SAMPLING_BATCH]), num_inference_steps=steps,
                    guidance_scale=SAMPLING_GUIDANCE, height=self.resolution, width=self.resolution,
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds[start: start + SAMPLING_BATCH]],
                    callback_on_step_end=self.editor.step_end_callback,
                ).images
            return images

        try:
            with torch.no_grad():
                yield sample
        finally:
            self.editor.set_step(None)  # training: every range active
            self.editor.guidance_halves = False
            self.editor.cache.clear()
            if self.condition is not None:
                self.editor.set_conditions([self.condition])
            self.editor.train_mode(True)

    def previews(self) -> list[Image.Image]:
        """Images from the fixed preview prompts and seeds, made by the training pipeline with the current tuner."""
        config = self.config
        keys = self.data.preview_keys(max(1, len(config.preview_prompts) or 2))
        prompts = list(config.preview_prompts) or [self.data.caption(k) for k in keys]
        if config.kind == "sc":  # an uncaptioned folder gives the trigger word twice: the same image
            prompts = list(dict.fromkeys(prompts))
        images = []
        with self._sampling() as sample:
            for n, prompt in enumerate(prompts):
                if config.kind == "csc":
                    picture = self.data.image(keys[n % len(keys)], self.resolution)
                    hint = make_condition(picture, config.condition, dict(config.condition_params), np.random.default_rng(n))
                    self.editor.set_conditions([ControlCondition(self.tuner, images_to_tensor([hint]).to(self.device))])
                images += sample([prompt] * len(config.preview_seeds), config.preview_seeds, config.preview_steps)
        return images

    def calibrate_default(self) -> list[CandidateScore]:
        """How each candidate default (scale, guidance half) of this SC tuner does on new prompts (see `calibration`)."""
        colour_accuracy = None
        if self.base_architecture == "tiny":  # the built-in model knows only Shapes scenes: the checker reads them
            scenes = [sample_scene(CALIBRATION_SEED + i, split="heldout") for i in range(CALIBRATION_PROMPTS)]
            prompts = [caption(scene) for scene in scenes]

            def colour_accuracy(images: Sequence[Image.Image]) -> float:
                return float(np.mean([score_adherence(image, scene).color_correct for image, scene in zip(images, scenes)]))
        else:
            prompts = list(GENERIC_PROMPTS[:CALIBRATION_PROMPTS])
        prompts = [prepare_caption(p, self.config.trigger) for p in prompts]
        pictures = [self.data.image(k, self.resolution) for k in self.data.preview_keys(CALIBRATION_PICTURES)]
        with self._sampling() as sample:
            self.editor.remove_sc_tuner("training")
            try:
                seeds = range(len(prompts))
                base = sample(prompts, seeds, CALIBRATION_STEPS)

                def generate(scale: float, conditional_only: bool, texture: bool) -> list[Image.Image]:
                    self.editor.add_sc_tuner("training", self.tuner, scale, conditional_only, texture)
                    return sample(prompts, seeds, CALIBRATION_STEPS)

                scores = score_candidates(pictures, base, generate, colour_accuracy)
            finally:
                self.editor.add_sc_tuner("training", self.tuner)
        logger.info("default use measured on %d new prompts: %s", len(prompts), ", ".join(
            f"scale {s.scale:g} ({s.how}): texture gain {s.texture_gain:.3f}, "
            f"colour drift {s.colour_drift:.3f}" + ("" if s.colour_loss is None else f", colour accuracy lost {s.colour_loss:.3f}")
            for s in scores))
        return scores

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> TrainingResult:
        """Train from the last checkpoint (with `config.resume`) to `config.steps`; `cancel` stops within one step."""
        config, accelerator = self.config, self.accelerator
        start, last_loss, earlier_seconds = self._load_checkpoint()
        started = time.perf_counter()

        def seconds() -> float:
            return earlier_seconds + time.perf_counter() - started

        losses: list[float] = [] if math.isnan(last_loss) else [last_loss]
        preview_paths: list[Path] = []
        checkpoint = self.checkpoint_path if start else None
        step = start
        while step < config.steps:
            if cancel is not None and cancel.is_set():
                if step > start:
                    checkpoint = self._save_checkpoint(step, _mean_tail(losses), seconds())
                logger.info("cancelled after step %d; checkpoint %s", step, checkpoint)
                return TrainingResult(None, step, True, checkpoint, _mean_tail(losses), seconds(),
                                      previews=preview_paths, main_process=accelerator.is_main_process)
            losses.append(self._step(step))
            step += 1
            event = TrainingProgress(step, config.steps, losses[-1], _eta(started, step - start, config.steps - step), seconds())
            if step % config.checkpoint_every == 0 or step == config.steps:
                event.checkpoint = checkpoint = self._save_checkpoint(step, _mean_tail(losses), seconds())
            if config.preview_every and (step % config.preview_every == 0 or step == config.steps) and accelerator.is_main_process:
                event.previews = self.previews()
                event.preview_paths = self._write_previews(step, event.previews)
                preview_paths += event.preview_paths
            if progress is not None and accelerator.is_main_process:
                progress(event)
        calibration = self.calibrate_default() if config.kind == "sc" and config.calibrate and accelerator.is_main_process else None
        metadata = self._metadata(step, seconds(), _mean_tail(losses), calibration)
        if accelerator.is_main_process:
            tuner = self.tuner if config.save_dtype == "float32" else _copy_as(self.tuner, torch.float16)
            save_tuner(tuner, config.out, metadata)
            logger.info("wrote %s after %d steps", config.out, step)
        accelerator.wait_for_everyone()
        return TrainingResult(config.out, step, False, checkpoint, _mean_tail(losses), seconds(), metadata,
                              preview_paths, accelerator.is_main_process)

    def _write_previews(self, step: int, images: list[Image.Image]) -> list[Path]:
        folder = self.config.work / PREVIEW_DIR
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            path = folder / f"step-{step:06d}-{i}.png"
            image.save(path)
            paths.append(path)
        return paths

    def _metadata(self, steps: int, seconds: float, loss: float, calibration: list[CandidateScore] | None = None) -> TunerMetadata:
        config = self.config
        summary = {
            "base_model": self.base_name,
            "steps": steps,
            "data": config.data,
            "dataset": self.data.description,
            "dataset_size": self.data.size if self.data.size is not None else steps * config.batch_size * self.accelerator.num_processes,
            "batch_size": config.batch_size,
            "processes": self.accelerator.num_processes,
            "learning_rate": config.learning_rate,
            "resolution": self.resolution,
            "seed": config.seed,
            "final_loss": round(loss, 6),
            "training_seconds": round(seconds, 1),  # all sessions of a resumed run
        }
        if config.condition_params:
            summary["condition_params"] = dict(config.condition_params)
        if config.remove_words:
            summary["removed_words"] = list(config.remove_words)
        if self.init_training is not None:
            summary["init"] = self.init_training  # the training behind the starting weights
        defaults = {}
        if config.kind == "sc":
            summary["preserve_base_above"] = config.preserve_base_above
        if calibration is not None:
            chosen = choose_default(calibration)
            defaults = dict(default_scale=chosen.scale, default_conditional_only=chosen.conditional_only, default_texture=chosen.texture)
            summary["default_use_measured"] = {
                "prompts": CALIBRATION_PROMPTS if self.base_architecture == "tiny" else len(GENERIC_PROMPTS),
                "max_colour_loss": MAX_COLOUR_LOSS, "max_colour_drift": MAX_COLOUR_DRIFT, "candidates": [asdict(s) for s in calibration],
            }
        return TunerMetadata.describe(self.tuner, self.base_architecture, trigger_word=config.trigger, training=summary, **defaults)


def _copy_as(tuner: Tuner, dtype: torch.dtype) -> Tuner:
    import copy

    return copy.deepcopy(tuner).to("cpu", dtype)


def _mean_tail(losses: Sequence[float], n: int = 20) -> float:
    tail = [x for x in losses[-n:] if math.isfinite(x)]
    return float(np.mean(tail)) if tail else float("nan")


def _eta(started: float, done: int, remaining: int) -> float:
    return (time.perf_counter() - started) / max(done, 1) * remaining


def train_tuner(config: TrainingConfig, progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> TrainingResult:
    """Train an SC or CSC tuner as `config` says, on a private copy of the base model, and write it to `config.out`."""
    return TunerTrainer(config).run(progress, cancel)

