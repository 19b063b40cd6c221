"""Smoke test of the real Stable Diffusion architectures: full-size random weights, loaded like real ones.

    python bench/real_architectures.py --arch sd15 [--arch sd21] [--work /tmp/real-arch] [--keep] [--threads 2] [--json [PATH]]

For each architecture it builds the complete pipeline from the real configs (UNet from
tuners/reference_configs.py; CLIP text encoder(s), VAE and scheduler as released) with random weights,
and saves it twice: as a diffusers folder and as one `.safetensors` file in the original (LDM) checkpoint
layout, written by diffusers' own conversion tables (scripts/convert_diffusers_to_original_stable_diffusion.py).
It also writes one SC tuner in this project's format and two CSC tuners in SCEPTER's official layout
(`0_SwiftSCETuning/`). Then, once per file form, a fresh process loads the model through `ModelManager`,
imports the two official CSC tuners into a tuner library, and generates 2 steps at 256 px on CPU with the
SC tuner, both CSC tuners (α 0.6 / 0.4) and Skip-Tuning ρ, printing load time, time per step and peak RSS.
The weights' checksums after loading must equal those written, for both forms.

Weights are stored in fp16 (half the disk) and loaded in fp32 (what `ModelManager` uses on CPU). Each
phase runs in its own process so that its peak RSS is its own. The multi-GB files are deleted at the end
unless `--keep`. Not run by CI: minutes per architecture.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

_common.set_threads()

import torch

ARCHITECTURES = ("sd15", "sd21")  # SDXL: see docs/benchmarks.md (does not fit this machine's memory share)
TOKENIZER = _common.ROOT / "assets" / "tiny-sd" / "tokenizer"  # CLIP's BPE vocabulary (49,408 tokens)
SIZE, STEPS = 256, 2

# The released text encoders and VAE (their config.json on the hub), and the schedulers.
TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768),  # openai/clip-vit-large-patch14
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512),  # OpenCLIP ViT-H/14, penultimate layer
}
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, scaling_factor=0.18215,
)
SCHEDULERS: dict[str, dict[str, Any]] = {
    "sd15": dict(prediction_type="epsilon"),
    "sd21": dict(prediction_type="v_prediction"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def checksums(pipeline: Any) -> dict[str, float]:
    """Per component, Σ_i (i+1) · sum(weight_i) over the weights in name order, in float64: equal after
    loading means no weight was lost, renamed away or swapped with another (q for k, say)."""
    result = {}
    for name in ("unet", "vae", "text_encoder"):
        named = sorted(getattr(pipeline, name).named_parameters())
        result[name] = float(sum((i + 1) * p.detach().double().sum() for i, (_, p) in enumerate(named)))
    return result


# -- build: random weights, the two file forms, the tuners ---------------------------------------------


def build_pipeline(architecture: str) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tuners.reference_configs import REFERENCE_UNET_CONFIGS

    torch.manual_seed(0)
    unet_config = REFERENCE_UNET_CONFIGS[architecture]
    # Built module by module and halved at once: the fp32 copy of one component at a time, never all.
    unet = UNet2DConditionModel(**unet_config).half()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **TEXT_ENCODERS[architecture])).half()
    vae = AutoencoderKL(**VAE, sample_size=unet_config["sample_size"] * 8).half()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, **SCHEDULERS[architecture],
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def original_layout(pipeline: Any, architecture: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights as an original SD checkpoint (`model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.`), by diffusers' conversion script, which lives outside the installed package."""
    import ldm_layout as convert

    unet = convert.convert_unet_state_dict(pipeline.unet.state_dict())
    vae = convert.convert_vae_state_dict(pipeline.vae.state_dict())
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); checkpoints and the tables have it.
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in pipeline.text_encoder.state_dict().items()}
    if architecture == "sd21":  # OpenCLIP layout: fused q/k/v, resblocks
        text = convert.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in text.items()})
        text = {"cond_stage_model.model." + k: v for k, v in text.items()}
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    state = {**{"model.diffusion_model." + k: v for k, v in unet.items()}, **{"first_stage_model." + k: v for k, v in vae.items()}, **text}
    return {k: v.contiguous() for k, v in state.items()}


def write_tuners(pipeline: Any, architecture: str, folder: Path) -> None:
    """One SC tuner (this project's file) and two CSC tuners in SCEPTER's layout, random non-zero weights."""
    from tuners import CSCTuner, SCTuner, SkipLayout, TunerMetadata, export_official, save_tuner

    layout = SkipLayout.from_unet(pipeline.unet)
    generator = torch.Generator().manual_seed(1)

    def randomise(tuner: Any) -> Any:
        with torch.no_grad():
            for p in tuner.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        return tuner

    style = randomise(SCTuner(layout, 1.0))
    save_tuner(style, folder / "style.safetensors", TunerMetadata.describe(style, architecture))
    # The released controllers' hint encoders: 256 wide for SD 1.5 / 2.1, 320 at twice the width for SDXL.
    hint = dict(hint_channels=320, hint_dim_ratio=2.0) if architecture == "sdxl" else {}
    for condition, kernel in (("canny", 3), ("depth", 1)):
        tuner = randomise(CSCTuner(layout, kernel, condition, **hint))
        export_official(tuner, TunerMetadata.describe(tuner, architecture), folder / f"{condition}_control")


def build(architecture: str, work: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    started = time.perf_counter()
    pipeline = build_pipeline(architecture)
    log(f"{architecture}: random pipeline built in {time.perf_counter() - started:.0f} s")
    pipeline.save_pretrained(work / "diffusers", safe_serialization=True)
    save_file(original_layout(pipeline, architecture), str(work / f"{architecture}.safetensors"))
    write_tuners(pipeline, architecture, work)
    parameters = {name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    return {"parameters": parameters, "checksums": checksums(pipeline), "build_s": round(time.perf_counter() - started, 1),
            "disk_gb": {"diffusers": _size_gb(work / "diffusers"), "single_file": _size_gb(work / f"{architecture}.safetensors")},
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def _size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 2)


# -- run: load through ModelManager, import the official tuners, generate -------------------------------


def run(architecture: str, work: Path, form: str) -> dict[str, Any]:
    from PIL import Image

    from scedit_ui.model_manager import ModelManager
    from scedit_ui.request import ConditionUse, GenerationRequest, SkipTuningSettings, TunerUse
    from scedit_ui.tuner_library import TunerLibrary

    manager = ModelManager("cpu")
    source = work / "diffusers" if form == "diffusers" else work / f"{architecture}.safetensors"
    started = time.perf_counter()
    info = manager.load(str(source), single_file_config=str(work / "diffusers") if form == "single_file" else None)
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_gb()
    log(f"{architecture} {form}: loaded as {info.family} in {load_s:.0f} s, peak RSS {rss_after_load:.1f} GB")

    library = TunerLibrary(work / f"library-{form}", shipped=work / "no-shipped-tuners")
    csc = [
        library.import_file(work / f"{condition}_control", layout=manager.editor.layout, base_architecture=info.family)
        for condition in ("canny", "depth")
    ]
    pictures = [Image.new("RGB", (SIZE, SIZE), colour) for colour in ("white", "gray")]
    request = GenerationRequest(
        prompt="a red circle on a blue background", seed=0, steps=STEPS, guidance=5.0, width=SIZE, height=SIZE,
        sc_tuners=(TunerUse(str(work / "style.safetensors"), 1.0),),
        conditions=(ConditionUse(str(csc[0]), pictures[0], 0.6), ConditionUse(str(csc[1]), pictures[1], 0.4)),
        skip_tuning=SkipTuningSettings(rho_outer=1.0, rho_inner=0.8),
    )
    # Wall and process CPU time per step: on a shared, busy machine CPU time is the steadier measure.
    marks = [(time.perf_counter(), time.process_time())]
    result = manager.generate(request, progress=lambda step, total: marks.append((time.perf_counter(), time.process_time())))
    pixels = torch.tensor(list(result.images[0].getdata()), dtype=torch.float32)
    if not torch.isfinite(pixels).all():
        raise SystemExit(f"{architecture} {form}: the image has non-finite values")
    return {
        "family": info.family,
        "load_s": round(load_s, 1),
        "step_s": [round(b[0] - a[0], 2) for a, b in zip(marks, marks[1:])],  # the first includes prompt encoding and condition features
        "step_cpu_s": [round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:])],
        "threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
        "generate_s": round(result.seconds, 1),
        "peak_rss_gb_after_load": round(rss_after_load, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "checksums": checksums(manager.pipeline),
        "image_std": round(float(pixels.std()), 2),
    }


# -- orchestration ------------------------------------------------------------------------------------


def phase(architecture: str, work: Path, name: str, threads: int) -> dict[str, Any]:
    """Run one phase in a fresh process (its peak RSS is its own) and return its JSON."""
    command = [sys.executable, __file__, "--phase", name, "--arch", architecture, "--work", str(work), "--threads", str(threads)]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, help="repeatable (default: sd15 and sd21)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/real-architectures"), help="temporary folder for the model files")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    parser.add_argument("--phase", choices=("build", "diffusers", "single_file"), help=argparse.SUPPRESS)
    _common.add_common_arguments(parser)
    args = parser.parse_args()
    architectures = args.arch or list(ARCHITECTURES)
    if args.phase:  # a child process: one phase of one architecture, in the folder the parent made for it
        result = build(architectures[0], args.work) if args.phase == "build" else run(architectures[0], args.work, args.phase)
        print(json.dumps(result))
        return

    results: dict[str, Any] = {"machine": _common.machine(), "size": SIZE, "steps": STEPS}
    for architecture in architectures:
        work = args.work / architecture
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            built = phase(architecture, work, "build", args.threads)
            results[architecture] = {"build": built}
            for form in ("diffusers", "single_file"):
                ran = phase(architecture, work, form, args.threads)
                if ran["checksums"] != built["checksums"]:
                    raise SystemExit(f"{architecture} {form}: weights after loading differ from those written: {ran['checksums']} vs {built['checksums']}")
                results[architecture][form] = ran
                log(f"{architecture} {form}: {json.dumps({k: v for k, v in ran.items() if k != 'checksums'})}")
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    _common.report(results, args.json)


if __name__ == "__main__":
    main()
