"""One prepared check for a CUDA machine (at most ~5 minutes): fp16 generation and autocast training.

    python bench/gpu_check.py [--device cuda] [--json [PATH]]         # the real check, on a GPU
    python bench/gpu_check.py --device cpu --quick                      # smoke test of this script

Parts, each timed, with peak `torch.cuda.max_memory_allocated` on CUDA:
  tiny_generate   built-in tiny model: SC tuner + 2 CSC tuners (α 0.6 / 0.4) + Skip-Tuning ρ, 20 steps
  tiny_train      30 steps of SC-Tuner training on the Shapes world (the trainer's fp16 autocast on CUDA)
  sd15_generate   random-weight SD 1.5 at full size, fp16: SC + 2 official-layout CSC tuners + ρ, 20 steps, 512 px
  sd15_train      30 steps of SC-Tuner training on it (autocast), 512 px, batch 2
  sdxl_generate   random-weight SDXL at full size, fp16 (its VAE upcasts, as diffusers' force_upcast says), 20 steps, 512 px
The UNet's output and the VAE's decoded image are checked for NaN/inf at every call: the script stops
with exit code 1 naming the part. A dtype error stops it too (the exception, exit code 1).

`--quick` shrinks the SD 1.5 and SDXL models to the same block structure at a small width, runs 2
generation steps and 3 training steps at 64-128 px: it proves the script on a CPU, not the GPU.
The random models are built directly on the device and saved in fp16 to a temporary folder, then loaded
through `ModelManager` like real weights. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common

_common.set_threads()

import torch
from real_architectures import TEXT_ENCODERS, TOKENIZER, VAE, write_tuners

# The SDXL text encoders as released (CLIP ViT-L and OpenCLIP ViT-bigG with projection).
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
# --quick: the same block structures at a small width.
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu", projection_dim=32)
SMALL = {
    "sd15": dict(block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, attention_head_dim=8, sample_size=8),
    "sdxl": dict(block_out_channels=[32, 64, 128], cross_attention_dim=64, attention_head_dim=[2, 4, 8],
                 transformer_layers_per_block=[1, 1, 2], addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                 sample_size=16),
}
SMALL_VAE = dict(VAE, block_out_channels=[32, 32, 64, 64])


class NonFiniteOutput(RuntimeError):
    """The UNet or the VAE produced NaN or inf."""


def watch_for_non_finite(pipeline: Any, part: str) -> None:
    """Raise `NonFiniteOutput` the moment the UNet's prediction or the decoded image holds NaN/inf."""

    def check(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            tensor = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
            if not torch.isfinite(tensor).all():
                raise NonFiniteOutput(f"{part}: the {name} output holds NaN or inf (dtype {tensor.dtype})")

        return hook

    pipeline.unet.register_forward_hook(check("UNet"))
    pipeline.vae.decoder.register_forward_hook(check("VAE decoder"))


def build_pipeline(architecture: str, quick: bool, device: torch.device) -> Any:
    """A random-weight pipeline of `architecture` (full size, or small with --quick), built on `device` in fp16."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tuners.reference_configs import REFERENCE_UNET_CONFIGS

    torch.manual_seed(0)
    unet_config = {**REFERENCE_UNET_CONFIGS[architecture], **(SMALL[architecture] if quick else {})}
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of minutes on its CPU
        unet = UNet2DConditionModel(**unet_config).to(dtype)
        vae_config = dict(SMALL_VAE if quick else VAE, sample_size=unet_config["sample_size"] * 8)
        text = lambda config: CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)
        if architecture == "sd15":
            text_encoder = CLIPTextModel(text(SMALL_TEXT if quick else TEXT_ENCODERS["sd15"])).to(dtype)
            vae = AutoencoderKL(**vae_config).to(dtype)
            scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1)
            return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        text_encoder = CLIPTextModel(text(SMALL_TEXT if quick else SDXL_TEXT)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(text(SMALL_TEXT if quick else SDXL_TEXT_2)).to(dtype)
        vae = AutoencoderKL(**vae_config, force_upcast=True).to(dtype)  # SDXL's VAE overflows in fp16
        vae.register_to_config(scaling_factor=0.13025)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


class Check:
    """Runs the parts in order, timing each and recording its peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.results: dict[str, Any] = {}

    def part(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _common.sync()
        started = time.perf_counter()
        details = fn()
        _common.sync()
        result = {"seconds": round(time.perf_counter() - started, 1), **details}
        if self.device.type == "cuda":
            result["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        self.results[name] = result
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)


def generate(manager: Any, folder: Path, size: int, steps: int, part: str) -> dict[str, Any]:
    """SC tuner + two CSC tuners (official layout, imported into a library) + ρ through `ModelManager.generate`."""
    from PIL import Image

    from scedit_ui.request import ConditionUse, GenerationRequest, SkipTuningSettings, TunerUse
    from scedit_ui.tuner_library import TunerLibrary

    library = TunerLibrary(folder / "library", shipped=folder / "none")
    csc = [library.import_file(folder / f"{c}_control", layout=manager.editor.layout, base_architecture=manager.family) for c in ("canny", "depth")]
    watch_for_non_finite(manager.pipeline, part)
    request = GenerationRequest(
        prompt="a red circle on a blue background", steps=steps, width=size, height=size,
        sc_tuners=(TunerUse(str(folder / "style.safetensors")),),
        conditions=tuple(ConditionUse(str(path), Image.new("RGB", (size, size), colour), alpha)
                         for path, colour, alpha in zip(csc, ("white", "gray"), (0.6, 0.4))),
        skip_tuning=SkipTuningSettings(rho_outer=1.0, rho_inner=0.8),
    )
    result = manager.generate(request)
    return {"image_size": list(result.images[0].size), "generate_s": round(result.seconds, 1), "dtype": str(manager.dtype)}


def train(base_model: str, work: Path, steps: int, resolution: int | None, batch_size: int, device: str) -> dict[str, Any]:
    import math

    from scedit_ui.training import TrainingConfig, train_tuner

    config = TrainingConfig(kind="sc", data="shapes", out=work / "trained.safetensors", steps=steps, batch_size=batch_size,
                            base_model=base_model, resolution=resolution, work_dir=work / "run", device=device, checkpoint_every=10**6)
    result = train_tuner(config)
    if not math.isfinite(result.loss):
        raise NonFiniteOutput(f"training on {base_model or 'tiny'}: the loss is {result.loss}")
    return {"steps": result.steps, "loss": round(result.loss, 4), "train_s": round(result.seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small models, 2-3 steps: a smoke test of the script")
    _common.add_common_arguments(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    from scedit_ui.model_manager import ModelManager

    device = torch.device(args.device)
    steps, train_steps = (2, 3) if args.quick else (20, 30)
    check = Check(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temp:
        work = Path(temp)
        try:
            tiny = work / "tiny"
            tiny.mkdir()

            def tiny_generate() -> dict[str, Any]:
                manager = ModelManager(args.device)
                manager.load("")
                write_tuners(manager.pipeline, "tiny", tiny)
                return generate(manager, tiny, 128, steps, "tiny_generate")

            check.part("tiny_generate", tiny_generate)
            check.part("tiny_train", lambda: train("", tiny, train_steps, 128 if not args.quick else 64, 4, args.device))
            for architecture in ("sd15", "sdxl"):
                folder = work / architecture
                pipeline = build_pipeline(architecture, args.quick, device)
                pipeline.save_pretrained(folder / "diffusers", safe_serialization=True)
                write_tuners(pipeline, architecture, folder)
                del pipeline
                size = 128 if args.quick else 512

                def generate_part(architecture: str = architecture, folder: Path = folder, size: int = size) -> dict[str, Any]:
                    manager = ModelManager(args.device)
                    manager.load(str(folder / "diffusers"))
                    return generate(manager, folder, size, steps, f"{architecture}_generate")

                check.part(f"{architecture}_generate", generate_part)
                if architecture == "sd15":  # the trainer takes SD 1.x/2.x bases
                    check.part("sd15_train", lambda folder=folder: train(str(folder / "diffusers"), folder, train_steps, 64 if args.quick else 512, 2, args.device))
        except NonFiniteOutput as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 1
    result = {"machine": _common.machine(), "quick": args.quick, "parts": check.results}
    _common.report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
