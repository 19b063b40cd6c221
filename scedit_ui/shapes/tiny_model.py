"""The built-in tiny Stable-Diffusion-architecture base model and the script that trains it.

The model is a regular diffusers Stable Diffusion folder (``assets/tiny-sd``): an x8
``AutoencoderKL`` (128 px images <-> 4x16x16 latents), a small CLIP text encoder with the real
CLIP BPE tokenizer, a ``UNet2DConditionModel`` with SD 1.5's block types (12 skip connections)
and a DDIM scheduler with SD's noise schedule. ``StableDiffusionPipeline.from_pretrained`` loads
it exactly like real SD weights.

It is trained from scratch on the Shapes world (:mod:`scedit_ui.shapes.world`) in four
resumable stages, each checkpointed atomically under a work directory::

    python -m scedit_ui.shapes.tiny_model train --work runs/tiny --out assets/tiny-sd

1. ``vae``   -- the autoencoder on random crops, then full 128 px images of plain scenes;
1b. ``decoder`` -- the decoder alone on plain and styled scenes (the latents do not change);
2. ``cache`` -- the scaling factor (1 / std of latents) and the latents of the training scenes;
3. ``unet``  -- UNet and text encoder jointly on the cached latents (EMA weights are exported).

Kill it at any time and rerun the same command: it continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from scedit_ui.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("assets/tiny-sd")
DEFAULT_WORK = Path("runs/tiny")
IMAGE_SIZE = 128
LATENT_SIZE = 16
MAX_TOKENS = 77
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# ---------------------------------------------------------------------------- architecture

# Sizes measured on a 2-core CPU (DESIGN.md §10): UNet 8.6 M parameters, ~1.1 s per training
# step at batch 32. The text encoder's hidden size is the UNet's cross-attention dim.
TEXT_HIDDEN = 64


def unet_config() -> dict:
    """SD 1.5's block layout (3 cross-attention down blocks + 1 plain, mirrored up) at small width."""
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=TEXT_HIDDEN,
        # diffusers reads this as the number of heads: 16 channels per head in every block.
        attention_head_dim=(2, 4, 8, 8),
        norm_num_groups=8,  # at least 4 channels per group (SD 1.5 has 10)
    )


def vae_config() -> dict:
    """Four encoder blocks (three x2 down-samplings) -> x8; narrow, because shapes are simple."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        # Four channels per group at full resolution, like SD's VAE: with one channel per group,
        # GroupNorm erases the colour of flat regions (a uniform background normalises to zero).
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1 / std of the training latents after stage 1
        force_upcast=False,
    )


def text_encoder_config() -> CLIPTextConfig:
    """A 4-layer CLIP text transformer; the 49,408 x 64 token embedding is most of its size."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )


def scheduler_config() -> dict:
    """SD 1.x's noise schedule (scaled_linear 0.00085..0.012, 1000 steps) for DDIM sampling."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_config())


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**vae_config())


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config())


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**scheduler_config())


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without safety checker, as real SD folders can be saved."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline_fp16(pipe: StableDiffusionPipeline, out: Path) -> None:
    """Write ``pipe`` as a diffusers folder with fp16 safetensors weights.

    Written to a sibling temp folder first and swapped in, so ``out`` is never half-written.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = {name: copy.deepcopy(module).to("cpu", torch.float16) for name, module in _weighted_components(pipe).items()}
    StableDiffusionPipeline(**{**pipe.components, **half}, requires_safety_checker=False).save_pretrained(
        tmp, safe_serialization=True
    )
    # Keep the classic vocab.json / merges.txt of SD folders next to tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        if (out / "tokenizer" / name).exists():
            shutil.copy2(out / "tokenizer" / name, tmp / "tokenizer" / name)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def _weighted_components(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def folder_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- tokenizer


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_tokenizer(bpe_vocab_gz: Path, out_dir: Path) -> CLIPTokenizer:
    """Build CLIP's tokenizer from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` and save it.

    The file ships inside the ``open-clip-torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
    The vocabulary is built exactly as CLIP's ``SimpleTokenizer`` does: the 256 byte characters,
    the same with ``</w>``, one token per merge (merge lines 1..48894), then the start and end
    tokens -- 49,408 tokens, the ids of every SD text encoder.
    """
    lines = gzip.open(bpe_vocab_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != CLIP_VOCAB_SIZE:
        raise UserInputError(f"{bpe_vocab_gz} is not CLIP's BPE vocabulary ({len(vocab)} tokens built).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_ids = {tok: i for i, tok in enumerate(vocab)}
    tokenizer = CLIPTokenizer(
        vocab=vocab_ids,
        merges=[tuple(m.split()) for m in merges],
        model_max_length=MAX_TOKENS,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tokenizer.save_pretrained(out_dir)
    # The classic files too, as in every SD folder (tokenizer.json alone serves transformers >= 4).
    (out_dir / "vocab.json").write_text(json.dumps(vocab_ids, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to 77, exactly as StableDiffusionPipeline tokenizes prompts."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ---------------------------------------------------------------------------- training config


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (with the Shapes world and the seed)."""

    seed: int = 0
    # stage 1: VAE
    vae_crop_steps: int = 3_500  # random crops of vae_crop_size px, batch vae_crop_batch
    vae_full_steps: int = 200  # full 128 px images, batch vae_full_batch
    vae_crop_size: int = 48
    vae_crop_batch: int = 16
    vae_full_batch: int = 8
    vae_lr: float = 1.5e-3
    vae_shape_weight: float = 4.0  # extra loss weight of shape pixels (small next to the background)
    vae_initial_logvar: float = -6.0
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 0.5
    # stage 1b: decoder on plain and styled scenes (encoder frozen)
    decoder_steps: int = 800
    decoder_batch: int = 8
    decoder_lr: float = 5e-4
    decoder_styled_fraction: float = 0.5
    # stage 2: latent cache
    cache_scenes: int = 30_000
    cache_chunk: int = 2_000
    # stage 3: UNet + text encoder
    unet_steps: int = 4_000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_warmup: int = 100
    unet_final_lr_fraction: float = 0.05
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 800
    eval_prompts: int = 48
    # stage 4: offset-noise fine-tune of the stage-3 export (see finetune_offset_noise)
    finetune_steps: int = 1_500
    finetune_lr: float = 2e-4
    finetune_warmup: int = 50
    finetune_final_lr_fraction: float = 0.1
    finetune_ema_decay: float = 0.995
    finetune_scenes: int = 8_000
    offset_noise: float = 0.3


VAE_SEED_OFFSET = 10_000_000  # VAE images use scene seeds disjoint from the cached UNet scenes
DECODER_SEED_OFFSET = 20_000_000
EVAL_SEED = 777
EVAL_STEPS = 20
EVAL_GUIDANCE = 5.0


def pick_device(threads: int = 2) -> torch.device:
    """CUDA when present, else the CPU with ``threads`` threads.

    On a CPU shared with other busy processes one thread is several times faster than two:
    oversubscribed OpenMP threads wait for each other at every operator.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    return torch.device("cpu")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, stage: str, total: int) -> int:
    """Load a stage checkpoint written by ``_atomic_save`` if there is one; returns the step to continue from."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("%s: resuming at step %d/%d", stage, state["step"], total)
    return state["step"]


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """Each step draws its randomness from its own seed, so a resumed run repeats it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)


def _scene_images(
    seeds: Sequence[int], styles: Sequence[str | None] | None = None
) -> tuple[torch.Tensor, list[str], list]:
    """Rendered training scenes (plain, or in ``styles[i]``) as a [-1, 1] batch, their captions and scenes."""
    from scedit_ui.shapes import world as shapes_world

    styles = styles if styles is not None else [None] * len(seeds)
    scenes = [shapes_world.sample_scene(int(s), split="train", style=st) for s, st in zip(seeds, styles)]
    arrays = np.stack([np.asarray(shapes_world.render_scene(s, IMAGE_SIZE)) for s in scenes])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, [shapes_world.caption(s) for s in scenes], scenes


def _shape_mask(images: torch.Tensor, scenes: list) -> torch.Tensor:
    """1 where a [-1, 1] image differs from its scene's background colour, else 0 (N x 1 x H x W)."""
    from scedit_ui.shapes import world as shapes_world

    background = torch.tensor([shapes_world.COLORS[s.background] for s in scenes], dtype=torch.float32)
    background = (background / 127.5 - 1.0)[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.05).float()


def _cosine_lr(step: int, total: int, warmup: int, final_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- stage 1: VAE


def _vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, weight: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample
    diff = recon - images
    # Shapes are flat colours with sharp edges: L1 keeps colours exact, the gradient term the edges.
    edge = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() + (diff[..., :, 1:] - diff[..., :, :-1]).abs().mean()
    pixel = (weight * (diff.abs() + diff.pow(2))).mean()
    return pixel + cfg.vae_edge_weight * edge + cfg.vae_kl_weight * posterior.kl().mean()


def train_vae(work: Path, cfg: TrainConfig, device: torch.device) -> AutoencoderKL:
    """Stage 1. Returns the trained VAE (scaling factor still 1); resumes from ``work/vae.pt``."""
    final = work / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    # Start with a nearly deterministic posterior: at the default std of 1 the sampling noise
    # drowns the detail of young latents, and the tiny KL weight takes thousands of steps to lower it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = cfg.vae_initial_logvar
    vae = vae.to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    total = cfg.vae_crop_steps + cfg.vae_full_steps
    ckpt_path = work / "vae.pt"
    start = _resume(ckpt_path, vae, optimizer, device, "vae", total)
    vae.train()
    t0, running = time.time(), 0.0
    for step in range(start, total):
        g = _step_generator(cfg.seed, 1, step)
        crop = step < cfg.vae_crop_steps
        batch = cfg.vae_crop_batch if crop else cfg.vae_full_batch
        images, _, scenes = _scene_images(range(VAE_SEED_OFFSET + step * batch, VAE_SEED_OFFSET + (step + 1) * batch))
        weight = 1 + cfg.vae_shape_weight * _shape_mask(images, scenes)
        if crop:
            size = cfg.vae_crop_size
            ys, xs = torch.randint(0, IMAGE_SIZE - size + 1, (2, batch), generator=g).tolist()
            images = torch.stack([im[:, y : y + size, x : x + size] for im, y, x in zip(images, ys, xs)])
            weight = torch.stack([w[:, y : y + size, x : x + size] for w, y, x in zip(weight, ys, xs)])
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _cosine_lr(step, total, 50, 0.05)
        loss = _vae_loss(vae, images.to(device), weight.to(device), cfg, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        running += loss.item()
        done = step + 1
        if done % 50 == 0 or done == total:
            logger.info("vae: step %d/%d loss %.4f (%.2f s/step)", done, total, running / 50, (time.time() - t0) / (done - start))
            running = 0.0
        if done % cfg.checkpoint_every == 0 or done == total:
            _atomic_save({"step": done, "model": vae.state_dict(), "optimizer": optimizer.state_dict()}, ckpt_path)
    vae.eval()
    tmp = final.with_name("vae.tmp")
    vae.save_pretrained(tmp)
    os.replace(tmp, final)
    logger.info("vae: done in %.1f min", (time.time() - t0) / 60)
    return vae


def train_decoder(work: Path, vae: AutoencoderKL, cfg: TrainConfig, device: torch.device) -> AutoencoderKL:
    """Stage 1b. Fine-tunes the decoder on plain and styled scenes; resumes from ``work/decoder.pt``.

    Stage 1 sees plain scenes only, and its decoder cannot draw stripes, dots, outlines or pixel
    blocks, so no style tuner could show them. The encoder stays frozen: the latents (and a UNet
    trained on them) do not change.
    """
    from scedit_ui.shapes import world as shapes_world

    final = work / "vae_decoder"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    vae = vae.to(device)
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained, lr=cfg.decoder_lr, weight_decay=0.0)
    ckpt_path = work / "decoder.pt"
    start = _resume(ckpt_path, vae, optimizer, device, "decoder", cfg.decoder_steps)
    vae.train()
    t0, running, batch = time.time(), 0.0, cfg.decoder_batch
    for step in range(start, cfg.decoder_steps):
        g = _step_generator(cfg.seed, 2, step)
        styled = torch.rand(batch, generator=g) < cfg.decoder_styled_fraction
        picks = torch.randint(0, len(shapes_world.STYLES), (batch,), generator=g).tolist()
        styles = [shapes_world.STYLES[k] if s else None for k, s in zip(picks, styled.tolist())]
        seeds = range(DECODER_SEED_OFFSET + step * batch, DECODER_SEED_OFFSET + (step + 1) * batch)
        images, _, scenes = _scene_images(seeds, styles)
        weight = 1 + cfg.vae_shape_weight * _shape_mask(images, scenes)
        for group in optimizer.param_groups:
            group["lr"] = cfg.decoder_lr * _cosine_lr(step, cfg.decoder_steps, 20, 0.05)
        loss = _vae_loss(vae, images.to(device), weight.to(device), cfg, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        running += loss.item()
        done = step + 1
        if done % 50 == 0 or done == cfg.decoder_steps:
            logger.info(
                "decoder: step %d/%d loss %.4f (%.2f s/step)", done, cfg.decoder_steps, running / 50, (time.time() - t0) / (done - start)
            )
            running = 0.0
        if done % cfg.checkpoint_every == 0 or done == cfg.decoder_steps:
            _atomic_save({"step": done, "model": vae.state_dict(), "optimizer": optimizer.state_dict()}, ckpt_path)
    vae.eval().requires_grad_(True)
    tmp = final.with_name("vae_decoder.tmp")
    vae.save_pretrained(tmp)
    os.replace(tmp, final)
    logger.info("decoder: done in %.1f min", (time.time() - t0) / 60)
    return vae


# ---------------------------------------------------------------------------- stage 2: latent cache


@torch.no_grad()
def cache_latents(work: Path, vae: AutoencoderKL, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """Stage 2. Sets the VAE's scaling factor and encodes ``cfg.cache_scenes`` training scenes.

    Latents (posterior means, unscaled, fp16) and captions are written in chunks, each chunk
    atomically, so an interrupted cache continues where it stopped. Returns scaled latents.
    """
    vae = vae.to(device).eval()
    cache_dir = work / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_chunks = math.ceil(cfg.cache_scenes / cfg.cache_chunk)
    latents, captions = [], []
    for c in range(n_chunks):
        path = cache_dir / f"chunk_{c:03d}.pt"
        if not path.exists():
            seeds = range(c * cfg.cache_chunk, min((c + 1) * cfg.cache_chunk, cfg.cache_scenes))
            chunk_latents, chunk_captions = [], []
            for i in range(0, len(seeds), 100):
                images, caps, _ = _scene_images(seeds[i : i + 100])
                chunk_latents.append(vae.encode(images.to(device)).latent_dist.mean.half().cpu())
                chunk_captions += caps
            _atomic_save({"latents": torch.cat(chunk_latents), "captions": chunk_captions}, path)
            logger.info("cache: chunk %d/%d (%.1f min)", c + 1, n_chunks, (time.time() - t0) / 60)
        chunk = torch.load(path, weights_only=True)
        latents.append(chunk["latents"])
        captions += chunk["captions"]
    latents_t = torch.cat(latents).float()
    scaling = 1.0 / latents_t.std().item()
    vae.register_to_config(scaling_factor=scaling)
    logger.info("cache: %d latents, std %.4f -> scaling_factor %.5f", len(latents_t), 1 / scaling, scaling)
    return latents_t * scaling, captions


# ---------------------------------------------------------------------------- stage 3: UNet + text encoder


def _snr(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


@dataclass(frozen=True)
class DenoiserStage:
    """What differs between stage 3 (from scratch) and stage 4 (offset-noise fine-tune)."""

    number: int
    steps: int
    lr: float
    warmup: int
    final_lr_fraction: float
    ema_decay: float
    offset_noise: float
    eval_every: int | None


def _train_denoiser(
    checkpoint: Path,
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    captions: list[str],
    cfg: TrainConfig,
    stage: DenoiserStage,
    device: torch.device,
) -> None:
    """UNet and text encoder trained jointly (epsilon, Min-SNR-gamma weighting, CFG dropout), resumable.

    Every ``stage.eval_every`` steps and at the end the EMA weights are exported to ``out`` and scored.
    """
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=1e-2)
    scheduler = build_scheduler()
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
        start = state["step"]
        logger.info("stage %d: resuming at step %d/%d", stage.number, start, stage.steps)
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    unet.train()
    text_encoder.train()
    t0, running = time.time(), 0.0
    for step in range(start, stage.steps):
        g = _step_generator(cfg.seed, stage.number, step)
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[idx]
        ids = token_ids[idx].clone()
        ids[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        if stage.offset_noise:
            noise += stage.offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * _cosine_lr(step, stage.steps, stage.warmup, stage.final_lr_fraction)
        text = text_encoder(ids.to(device))[0]
        pred = unet(noisy.to(device), t.to(device), text).sample
        snr = _snr(scheduler, t)
        weight = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).to(device)  # Min-SNR-gamma for epsilon
        loss = (weight * (pred - noise.to(device)).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        decay = min(stage.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running += loss.item()
        done = step + 1
        if done % 50 == 0 or done == stage.steps:
            logger.info(
                "stage %d: step %d/%d loss %.4f lr %.2e (%.2f s/step)",
                stage.number, done, stage.steps, running / 50, optimizer.param_groups[0]["lr"], (time.time() - t0) / (done - start),
            )
            running = 0.0
        if done % cfg.checkpoint_every == 0 or done == stage.steps:
            _atomic_save(
                {
                    "step": done,
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema,
                },
                checkpoint,
            )
        if stage.eval_every and done % stage.eval_every == 0 and done < stage.steps:
            export(out, vae, tokenizer, unet, text_encoder, params, ema, device)
            evaluate_export(out, cfg.eval_prompts, checkpoint.parent, f"stage{stage.number}-step{done}")
            unet.train()
            text_encoder.train()
    logger.info("stage %d: done (%.1f min this run)", stage.number, (time.time() - t0) / 60)
    # Outside the loop, so rerunning a finished run exports again (e.g. after a new decoder).
    export(out, vae, tokenizer, unet, text_encoder, params, ema, device)
    evaluate_export(out, cfg.eval_prompts, checkpoint.parent, f"stage{stage.number}-step{stage.steps}")


def train_unet(
    work: Path,
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    captions: list[str],
    cfg: TrainConfig,
    device: torch.device,
) -> None:
    """Stage 3: UNet and text encoder from scratch on the cached latents; the EMA weights go to ``out``."""
    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder = build_unet().to(device), build_text_encoder().to(device)
    stage = DenoiserStage(
        number=3, steps=cfg.unet_steps, lr=cfg.unet_lr, warmup=cfg.unet_warmup, final_lr_fraction=cfg.unet_final_lr_fraction,
        ema_decay=cfg.ema_decay, offset_noise=0.0, eval_every=cfg.eval_every,
    )
    _train_denoiser(work / "unet.pt", out, vae, tokenizer, unet, text_encoder, latents, captions, cfg, stage, device)


# ---------------------------------------------------------------------------- stage 4: offset-noise fine-tune

FINETUNE_MARKER = "offset_noise_finetune.json"


def finetune_offset_noise(work: Path, out: Path, cfg: TrainConfig, device: torch.device) -> None:
    """Stage 4: fine-tune the exported UNet and text encoder with offset noise; the result replaces ``out``.

    Why: SD's noise schedule keeps sqrt(alpha_bar) = 0.07 of the image at the first sampling step, and
    on 16x16 latents the mean over 256 pixels makes that a clear signal of the background colour. The
    stage-3 model learned to read the background from it instead of from the prompt, and sampling starts
    from pure noise, which carries no such signal: backgrounds ignored the prompt (0.105 accuracy). A
    random per-channel constant added to the noise (offset noise) hides the mean, so the text must give it.

    Starts from the stage-3 export in ``out`` (never from an already fine-tuned one: ``out`` then holds
    ``FINETUNE_MARKER``), resumes from ``work/finetune.pt``, and writes the marker with the settings.
    """
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "finetune.pt"
    if not checkpoint.exists() and (out / FINETUNE_MARKER).exists():
        raise UserInputError(
            f"{out} is already fine-tuned with offset noise ({FINETUNE_MARKER}); start from a stage-3 export "
            "or resume with the --work folder of that run."
        )
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    vae, unet, text_encoder = pipe.vae.to(device).eval(), pipe.unet.to(device), pipe.text_encoder.to(device)
    latents_path = work / "finetune_latents.pt"
    if not latents_path.exists():
        chunks, captions = [], []
        with torch.no_grad():
            for i in range(0, cfg.finetune_scenes, 200):
                images, caps, _ = _scene_images(range(i, min(i + 200, cfg.finetune_scenes)))
                chunks.append(vae.encode(images.to(device)).latent_dist.mean.cpu())
                captions += caps
        _atomic_save({"latents": torch.cat(chunks) * vae.config.scaling_factor, "captions": captions}, latents_path)
    cached = torch.load(latents_path, weights_only=True)
    stage = DenoiserStage(
        number=4, steps=cfg.finetune_steps, lr=cfg.finetune_lr, warmup=cfg.finetune_warmup,
        final_lr_fraction=cfg.finetune_final_lr_fraction, ema_decay=cfg.finetune_ema_decay,
        offset_noise=cfg.offset_noise, eval_every=None,
    )
    t0 = time.time()
    _train_denoiser(checkpoint, out, vae, pipe.tokenizer, unet, text_encoder, cached["latents"], cached["captions"], cfg, stage, device)
    summary = {"steps": stage.steps, "lr": stage.lr, "offset_noise": stage.offset_noise, "scenes": cfg.finetune_scenes,
               "seconds_last_run": round(time.time() - t0)}
    (out / FINETUNE_MARKER).write_text(json.dumps(summary, indent=1) + "\n")


def export(
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    params: list[torch.nn.Parameter],
    ema: list[torch.Tensor],
    device: torch.device,
) -> None:
    """Save the pipeline with the EMA weights (fp16) to ``out``; the live weights are restored."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    pipe = assemble_pipeline(vae.to(device), text_encoder, tokenizer, unet)
    save_pipeline_fp16(pipe, out)
    with torch.no_grad():
        for p, w in zip(params, live):
            p.copy_(w)
    logger.info("export: %s (%.1f MB)", out, folder_size_bytes(out) / 1e6)


# ---------------------------------------------------------------------------- eval


def evaluate_export(out: Path, n: int, work: Path, tag: str) -> None:
    """Score the exported folder as `python -m scedit_ui eval adherence` does (DDIM, 20 steps, guidance 5)."""
    from scedit_ui.shapes.evaluation import evaluate_adherence

    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int):
        # Noise from a CPU generator, as the app makes it, so scores match `scedit_ui eval adherence`.
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, num_inference_steps=EVAL_STEPS, guidance_scale=EVAL_GUIDANCE, generator=generator).images[0]

    report = evaluate_adherence(generate, n, seed=EVAL_SEED)
    logger.info(
        "eval %s: colour %.3f shape %.3f (n=%d, %d DDIM steps, guidance %g, %.0f s)",
        tag, report.color_accuracy, report.shape_accuracy, n, EVAL_STEPS, EVAL_GUIDANCE, report.seconds,
    )
    with open(work / "eval.jsonl", "a") as f:
        f.write(json.dumps({"tag": tag, "steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE, **report.to_dict()}) + "\n")


# ---------------------------------------------------------------------------- all stages


def _claim_work_folder(work: Path, cfg: TrainConfig) -> Path:
    """``work``, created and stamped with ``cfg``; a folder of a run with another configuration is refused."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != asdict(cfg):
        raise UserInputError(f"{work} holds a run with a different configuration; use another --work folder.")
    config_path.write_text(json.dumps(asdict(cfg), indent=1))
    return work


def train(work: Path, out: Path, cfg: TrainConfig = TrainConfig(), threads: int = 2) -> None:
    """Run (or resume) every stage; the tokenizer must already be in ``out/tokenizer``."""
    tokenizer_dir = Path(out) / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists():
        raise UserInputError(
            f"No tokenizer in {tokenizer_dir}. Build it first: python -m scedit_ui.shapes.tiny_model "
            f"build-tokenizer --bpe-vocab PATH/bpe_simple_vocab_16e6.txt.gz --out {out}"
        )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    work = _claim_work_folder(work, cfg)
    device = pick_device(threads)
    logger.info("training on %s (%d CPU threads) with %s", device, torch.get_num_threads(), cfg)
    t0 = time.time()
    vae = train_decoder(work, train_vae(work, cfg, device), cfg, device)
    t1 = time.time()
    latents, captions = cache_latents(work, vae, cfg, device)
    t2 = time.time()
    train_unet(work, Path(out), vae, tokenizer, latents, captions, cfg, device)
    t3 = time.time()
    finetune_offset_noise(work, Path(out), cfg, device)
    logger.info(
        "all stages done: vae %.1f min, cache %.1f min, unet %.1f min, offset-noise fine-tune %.1f min (this run)",
        (t1 - t0) / 60, (t2 - t1) / 60, (t3 - t2) / 60, (time.time() - t3) / 60,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scedit_ui.shapes.tiny_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_tok = sub.add_parser("build-tokenizer", help="build the CLIP tokenizer into OUT/tokenizer")
    p_tok.add_argument("--bpe-vocab", type=Path, required=True, help="bpe_simple_vocab_16e6.txt.gz (from open-clip-torch)")
    p_tok.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p_train = sub.add_parser("train", help="train (or resume) all stages")
    p_train.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints, caches and train.log")
    p_train.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p_train.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy shared CPU)")
    p_finetune = sub.add_parser("finetune", help="stage 4 alone: offset-noise fine-tune of the stage-3 export in --out")
    p_finetune.add_argument("--work", type=Path, required=True, help="checkpoint, latents and train.log of this stage")
    p_finetune.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p_finetune.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy shared CPU)")
    args = parser.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.command in ("train", "finetune"):
        args.work.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.work / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    try:
        if args.command == "build-tokenizer":
            build_clip_tokenizer(args.bpe_vocab, args.out / "tokenizer")
        elif args.command == "finetune":
            cfg = TrainConfig()
            finetune_offset_noise(_claim_work_folder(args.work, cfg), args.out, cfg, pick_device(args.threads))
        else:
            train(args.work, args.out, threads=args.threads)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
