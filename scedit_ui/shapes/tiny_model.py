"""The built-in tiny Stable-Diffusion-architecture base model and the script that trains it.

The model is a regular diffusers Stable Diffusion folder (``assets/tiny-sd``): an x4
``AutoencoderKL`` (128 px images <-> 4 x 32 x 32 latents; x8 with 16 x 16 latents is the other choice), a
small CLIP text encoder with the real CLIP BPE tokenizer, a ``UNet2DConditionModel`` with SD 1.5's block
types (12 skip connections; on the x4 latent without attention at its 32 x 32 top level, as SDXL) and a DDIM
scheduler with SD's noise schedule. ``StableDiffusionPipeline.from_pretrained`` loads it exactly like real SD weights.

It is trained from scratch on the Shapes world (:mod:`scedit_ui.shapes.world`) in three
resumable stages, each checkpointed atomically under a work directory::

    python -m scedit_ui.shapes.tiny_model train --work runs/tiny --out assets/tiny-sd

1. ``vae``   -- the autoencoder on random crops, then full 128 px images, of plain and styled scenes;
   its encode-decode round trip of clean held-out renders is scored by the checker;
2. ``cache`` -- the scaling factor (1 / std of latents) and the latents of the training scenes (plain and
   the base styles);
3. ``unet``  -- UNet and text encoder jointly on the cached latents, with offset noise and free-form
   captions written afresh at every step (the EMA weights are exported and scored).

``--init FOLDER`` starts stage 3 from an existing model folder (its VAE is kept, stage 1 is skipped);
``--set name=value`` overrides any :class:`TinyModelConfig` field. Kill it at any time and rerun the same
command: it continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from scedit_ui.model_manager import BUILTIN_MODEL
from scedit_ui.shapes import world
from scedit_ui.shapes.checker import parse_prompt, score_adherence, style_score
from scedit_ui.shapes.evaluation import PROMPT_SETS, evaluate_adherence
from scedit_ui.shapes.world import Scene
from tuners.io import new_file_mode
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_WORK = Path("runs/tiny")
IMAGE_SIZE = 128
MAX_TOKENS = 77
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# ---------------------------------------------------------------------------- architecture

# Sizes measured on a 2-core CPU (DESIGN.md §10): UNet 8.6 M parameters, ~1.1 s per training
# step at batch 32. The text encoder's hidden size is the UNet's cross-attention dim.
TEXT_HIDDEN = 64


# Attention only on grids this small or smaller. At 32 x 32 (the x4 latent) self-attention over 1,024 tokens is
# half the cost of a training step (2.17 s -> 1.07 s at batch 32, bench/unet_step.py); SDXL leaves its top level
# without attention for the same reason.
ATTENTION_MAX_GRID = 16


def unet_config(latent_channels: int = 4, latent_downsample: int = 8) -> dict:
    """SD 1.5's block layout (3 cross-attention down blocks + 1 plain, mirrored up) at small width.

    On the x4 latent the top level has no attention (SDXL's layout); 12 skip connections either way.
    """
    grid = IMAGE_SIZE // latent_downsample
    attention = [grid // 2**level <= ATTENTION_MAX_GRID for level in range(3)] + [False]
    return dict(
        sample_size=grid,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=TEXT_HIDDEN,
        # diffusers reads this as the number of heads: 16 channels per head in every block.
        attention_head_dim=(2, 4, 8, 8),
        norm_num_groups=8,  # at least 4 channels per group (SD 1.5 has 10)
    )


def vae_config(latent_channels: int = 4, latent_downsample: int = 8) -> dict:
    """Four encoder blocks (three x2 down-samplings) -> x8, or three -> x4; narrow, because shapes are simple."""
    widths = {8: (16, 32, 64, 64), 4: (16, 32, 64)}[latent_downsample]
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
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


def scheduler_config(zero_terminal_snr: bool = False) -> dict:
    """SD 1.x's noise schedule (scaled_linear 0.00085..0.012, 1000 steps) for DDIM sampling.

    ``zero_terminal_snr``: the betas rescaled so that the last timestep keeps nothing of the image, with
    v-prediction and sampling from that timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"; SD 2.1's prediction type): the first sampling step then sees pure noise, as training did.
    """
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    return config


def build_unet(latent_channels: int = 4, latent_downsample: int = 8) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_config(latent_channels, latent_downsample))


def build_vae(latent_channels: int = 4, latent_downsample: int = 8) -> AutoencoderKL:
    return AutoencoderKL(**vae_config(latent_channels, latent_downsample))


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config())


def build_scheduler(zero_terminal_snr: bool = False) -> DDIMScheduler:
    return DDIMScheduler(**scheduler_config(zero_terminal_snr))


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without safety checker, as real SD folders can be saved."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or build_scheduler(),
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
    _give_weights_the_umask_mode(tmp)
    # Keep the classic vocab.json / merges.txt of SD folders next to tokenizer.json (save_pretrained drops them).
    sources = (out / "tokenizer", Path(pipe.tokenizer.name_or_path))
    for name in ("vocab.json", "merges.txt"):
        source = next((d / name for d in sources if (d / name).exists()), None)
        if source is not None:
            shutil.copy2(source, tmp / "tokenizer" / name)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def _give_weights_the_umask_mode(folder: Path) -> None:
    """diffusers' ``save_pretrained`` writes safetensors weights private (0600), unlike the configs beside them."""
    mode = new_file_mode()
    for weights in Path(folder).rglob("*.safetensors"):
        weights.chmod(mode)


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
class TinyModelConfig:
    """Everything that determines the trained weights (with the Shapes world and the seed).

    ``train --set name=value`` overrides any field, e.g. to size a run to the machine.
    """

    seed: int = 0
    # Start the UNet and text encoder from this model folder and keep its VAE (skips stage 1).
    init: str | None = None
    # stage 1: VAE, on plain scenes and every style (so it encodes the base styles and decodes the tuner ones)
    # 4 x 32 x 32 met both round-trip targets; 8 x 16 x 16 kept shapes 0.77 of the time (docs/tiny-model.md)
    latent_channels: int = 4
    latent_downsample: int = 4  # 4: 32 x 32 latents; 8: 16 x 16 (a UNet step about half the cost)
    vae_crop_steps: int = 4_000  # random crops of vae_crop_size px, batch vae_crop_batch
    vae_full_steps: int = 700  # full 128 px images, batch vae_full_batch
    vae_crop_size: int = 32
    vae_crop_batch: int = 16
    vae_full_batch: int = 8
    vae_lr: float = 1.5e-3
    vae_styled_fraction: float = 0.4
    vae_shape_weight: float = 4.0  # extra loss weight of shape pixels (small next to the background)
    vae_initial_logvar: float = -6.0
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 0.5
    round_trip_scenes: int = 100  # held-out clean renders scored after an encode-decode round trip
    # stage 2: latent cache (plain scenes and the base styles)
    cache_scenes: int = 12_000
    cache_chunk: int = 1_000
    base_styled_fraction: float = 0.2
    # stage 3: UNet + text encoder
    # 1.6 s each at batch 32 on two CPU threads from scratch (1.8 with the plain share) on the 2-core VM of the last
    # rounds on its faster days, 2.6 (3.2) on its slowest, where the whole recipe took 216 min (docs/tiny-model.md,
    # "Only the plain share in the second half ..."). 6,000 steps with both layout shares drew held-out shapes better
    # in more time and counted worse (numbers at layout_shares_from). Batch 16 for the same time learned less per
    # sample (docs/tiny-model.md, "Batch 16 ..."), and batch 64 for the same samples took as long, drew held-out
    # prompts better and plain ones worse ("Batch 64 ...").
    unet_steps: int = 4_000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    # The text encoder's learning rate as a multiple of unet_lr (docs/tiny-model.md: at 1x the shape words stayed
    # indistinguishable to the UNet after 7,000 steps).
    text_lr_scale: float = 1.0
    unet_warmup: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Extra loss weight of the latent pixels a shape covers (and their neighbours): shapes are a small part of
    # each scene, and an unweighted loss taught the background long before the shapes (A/B in docs/tiny-model.md);
    # 8 rather than 4 raised every held-out score of the one command's export, and 12 lowered held-out shape and count
    # and plain shape again (docs/tiny-model.md, "Twice the weight ..." and "Three times ...").
    unet_shape_weight: float = 8.0
    # A random per-channel constant added to the noise, so the background colour must come from the text
    # (docs/tiny-model.md: without it the model read the background from the first step's latent mean).
    offset_noise: float = 0.3
    # The same for the layout: noise of this strength on 2x2, 4x4 and 8x8 grids (bilinearly upsampled) is added too,
    # so that at high noise the latent no longer shows where the shapes are and how many there are and the text must
    # say it (docs/tiny-model.md: the built-in model placed its shapes where the faint signal left in the noisiest
    # latent put them, whatever the prompt said).
    layout_noise: float = 1.0
    # Zero SNR at the last timestep, v-prediction (`scheduler_config`): no layout at all is left in the noisiest
    # latent, and the loss there weighs the clean-image error fully (epsilon's weighs it by the SNR, ~0.005).
    zero_terminal_snr: bool = True
    # The share of each batch whose timestep is drawn from the top quarter of the schedule (the rest uniformly):
    # where the layout must come from the text, which uniform sampling visits a quarter of the time.
    high_noise_fraction: float = 0.0
    # The share of each batch given to scenes captioned with their cells, at the last timestep (only with
    # zero_terminal_snr, where that latent holds nothing of the picture): there the words alone say where the shape
    # goes, and a uniform draw visits it once in 1,000 (docs/tiny-model.md: 300 steps of such batches alone took
    # layout_from_text on a blank latent from 0.11 to 0.59, where 2,000 steps of the mixed recipe left it at 0.11).
    # Off by default (the built-in model had it): position came from the free rows alone, and from scratch, 4,000
    # steps, 200 held-out / 100 plain prompts, the plain share without this one gave held-out 0.915 / 0.751 / 0.912 /
    # 0.550 and plain 0.990 / 0.880 against 0.953 / 0.652 / 0.948 / 0.385 and 0.990 / 0.690 with it, and each step
    # cheaper by this share's guided first step (docs/tiny-model.md, "Only the plain share in the second half ...").
    position_fraction: float = 0.0
    # The most shapes a scene of that share may hold: 1 teaches where one shape goes; more teach several named shapes
    # their cells and their number together, as the held-out prompts (1-3 shapes) ask.
    position_shapes: int = 3
    # That share's timesteps are drawn from the last this many of the schedule (1: the last only). Above 1 the
    # latent keeps a faint layout beside the training noise's coarse blobs, and the named cells must win over the
    # blobs: sampling's first steps leave such blobs, and models trained at the last timestep alone drew a second
    # copy of a named shape on them.
    position_timesteps: int = 100
    # That share's latents below the last timestep are made from the model's own first sampling step (its guided
    # clean-image prediction from pure noise, renoised as DDIM does) instead of from the scene, and the model learns
    # to take them to the scene: where its first step left bumps in unnamed cells, the words must remove them.
    position_rollout: bool = False
    # With position_rollout, that share starts after 1 to this many steps of the model's own guided sampling
    # (EVAL_STEPS trailing DDIM steps; the number drawn per training step), its timesteps as many sampler steps lower.
    # One step teaches the model to remove the bumps its first step leaves; sampling then grows the copies of a
    # second named shape that its first step spreads over every cell for a few steps more, and only the model's own
    # later latents show it those (docs/tiny-model.md: 4 steps for 1,000 steps gave position +0.04, count no gain).
    position_rollout_steps: int = 1
    # The share of that share's scenes of several shapes captioned with the cell of one shape only, that shape's
    # clause last: the built-in model places the first-named shape and spreads later ones over every cell
    # (docs/tiny-model.md), and here only a later clause says where a shape goes.
    position_cell_last_fraction: float = 0.0
    # The share of each batch given to one-shape scenes captioned as plain prompts ("a red circle on a white
    # background"), at the last `position_timesteps` timesteps and started from the model's own first step, with
    # the shape moved to the cell where that first step drew most of it: an unnamed cell is the model's choice,
    # and it learns to keep the copy it began and drop the others (plain prompts drew two or three copies).
    plain_rollout_fraction: float = 0.25
    # That share's cell comes from its starting noise instead: the cell where the white noise sampling starts from
    # is highest (those rows get no layout noise, as sampling gets none). The first step's cell is the same for
    # every seed of a prompt, so a model trained to keep it drew a plain prompt's shape in one cell whatever the seed
    # (bench/layout_diversity.py); the noise's cell differs per seed, and the model can read it from its input.
    plain_cell_from_noise: bool = False
    # The fraction of unet_steps after which position_fraction and plain_rollout_fraction take their shares of each
    # batch (before it every row has a free caption and a uniform timestep). The shapes are learned from the free
    # rows, and a model that cannot draw yet has no first step worth starting from; each started row costs a guided
    # forward pass. 6,000 steps with both shares, 200 held-out / 100 plain prompts: held-out 0.914 / 0.652 / 0.907 /
    # 0.290 and plain 0.980 / 0.800 from step 0, 0.967 / 0.784 / 0.958 / 0.490 and 0.980 / 0.860 from halfway; the
    # default's 4,000 steps with the plain share alone from 0.6 above (docs/tiny-model.md).
    layout_shares_from: float = 0.6
    # Weight of the layout reader's loss (:class:`LayoutReader`, a training aid that is not exported): the text
    # encoder must also say, for every clause, what its cell holds, in a form cross-attention reads. Trained by the
    # diffusion loss alone, the encoder says the first clause's cell and hardly the later ones' (bench/
    # text_layout_probe.py finds the colour in the cell of the 1st / 2nd / 3rd clause 0.993 / 0.287 / 0.218 of the
    # time for the 23,000-step model), and the UNet spreads the later shapes over every cell; 0.1 for 3,200 steps
    # made that 0.982 / 0.996 / 0.993 and the pictures' count 0.250 -> 0.465 (docs/tiny-model.md).
    layout_loss_weight: float = 0.1
    # Weight of the shape-map reader's loss (:class:`ShapeMapReader`, a training aid that is not exported): a head on
    # the UNet's decoder features (16 x 16 on the x4 latent) names the kind and colour of what the clean scene has at
    # each place, so the features must carry it (as REPA aligns a diffusion model's features with a trained
    # encoder's; here with the scene's own labels). From scratch, 4,000 steps, 200 held-out prompts: colour / shape /
    # position / count 0.842 / 0.391 / 0.794 / 0.155 without it, 0.874 / 0.413 / 0.854 / 0.255 at 0.25
    # (docs/tiny-model.md).
    shape_map_loss_weight: float = 0.25
    # Weight of a loss that keeps the text encoder's outputs at the five shape words apart ("a <colour> <shape> on a
    # <background> background", one random colour and background per step): each pair's cosine similarity above
    # SHAPE_WORD_MARGIN, averaged. Trained by the diffusion loss alone they stay at 0.92 after 4,000 steps from
    # scratch (the built-in model's separated to 0.47 over 27,700 steps, and its shapes followed), so the UNet gets
    # nearly one vector for every shape word. From scratch, 4,000 steps: held-out shape 0.413 -> 0.600, plain
    # 0.470 -> 0.600, the rest within the noise (docs/tiny-model.md).
    shape_word_loss_weight: float = 1.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 1_000  # 0: score only the final export
    eval_prompts: int = 16  # per prompt set (held-out and plain); 0: no scoring


VAE_SEED_OFFSET = 10_000_000  # VAE images use scene seeds disjoint from the cached UNet scenes
ROUND_TRIP_SEED = 5_000
EVAL_SEED = 777
EVAL_STEPS = 20
EVAL_GUIDANCE = 5.0


def training_device(threads: int = 2) -> torch.device:
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


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """Each step draws its randomness from its own seed, so a resumed run repeats it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)


def _pick_styles(n: int, fraction: float, styles: Sequence[str], generator: torch.Generator) -> list[str | None]:
    """``n`` styles: each styled with probability ``fraction``, then one of ``styles`` uniformly."""
    styled = (torch.rand(n, generator=generator) < fraction).tolist()
    picks = torch.randint(0, len(styles), (n,), generator=generator).tolist()
    return [styles[k] if s else None for k, s in zip(picks, styled)]


def _scenes(seeds: Sequence[int], styles: Sequence[str | None]) -> list[Scene]:
    return [world.sample_scene(int(s), split="train", style=st) for s, st in zip(seeds, styles)]


def _render(scenes: Sequence[Scene]) -> torch.Tensor:
    """Rendered scenes as a [-1, 1] batch."""
    arrays = np.stack([np.asarray(world.render_scene(s, IMAGE_SIZE)) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _shape_mask(images: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
    """1 where a [-1, 1] image differs from its scene's background colour, else 0 (N x 1 x H x W)."""
    background = torch.tensor([world.COLORS[s.background] for s in scenes], dtype=torch.float32)
    background = (background / 127.5 - 1.0)[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.05).float()


def _latent_shape_weight(scenes: Sequence[Scene], size: tuple[int, int], extra: float) -> torch.Tensor:
    """1 + `extra` × the fraction of each latent pixel (grown by one pixel) that the scenes' shapes cover (N x 1 x h x w).

    The mask comes from the plain render, so a styled scene weighs its shapes, not its texture."""
    plain = [replace(scene, style=None) for scene in scenes]
    cover = F.adaptive_avg_pool2d(_shape_mask(_render(plain), plain), size)
    return 1.0 + extra * F.max_pool2d(cover, 3, stride=1, padding=1)


def _to_images(batch: torch.Tensor) -> list[Image.Image]:
    arrays = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


# ---------------------------------------------------------------------------- stage 1: VAE


def _vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, weight: torch.Tensor, cfg: TinyModelConfig, generator: torch.Generator
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


@torch.no_grad()
def _round_trip(vae: AutoencoderKL, scenes: Sequence[Scene], device: torch.device) -> tuple[list[Image.Image], list[Image.Image]]:
    """The renders of ``scenes`` and the same after encode + decode (posterior mean)."""
    renders = _render(scenes)
    decoded = torch.cat([
        vae.decode(vae.encode(renders[i : i + 25].to(device)).latent_dist.mean).sample.cpu() for i in range(0, len(scenes), 25)
    ])
    return _to_images(renders), _to_images(decoded)


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKL, n: int, device: torch.device) -> dict[str, float]:
    """Checker scores of clean held-out renders after encode + decode: the ceiling of any UNet on this VAE.

    Also, per style, the style score of styled renders after the round trip relative to before (``style <name>``):
    what a style tuner can show at most through this VAE.
    """
    vae = vae.to(device).eval()
    scenes = [world.sample_scene(ROUND_TRIP_SEED + j, split="heldout") for j in range(n)]
    scores = [score_adherence(image, scene) for image, scene in zip(_round_trip(vae, scenes, device)[1], scenes)]
    fields = ("color_correct", "shape_correct", "position_correct", "count_correct", "background_correct")
    result = {f: float(np.mean([float(getattr(s, f)) for s in scores])) for f in fields}
    for style in world.STYLES:
        styled = [replace(scene, style=style) for scene in scenes[: max(1, n // 4)]]
        before, after = (np.mean([style_score(image, style) for image in images]) for images in _round_trip(vae, styled, device))
        result[f"style {style}"] = float(after / max(before, 1e-6))
    return result


def train_vae(work: Path, cfg: TinyModelConfig, device: torch.device) -> AutoencoderKL:
    """Stage 1. Returns the trained VAE (scaling factor still 1); resumes from ``work/vae.pt``.

    Plain and styled scenes (every style): the encoder must read the base styles the UNet learns and
    the decoder must draw the tuner styles (stripes, polka dots) that only tuners ask for.
    """
    final = work / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.latent_channels, cfg.latent_downsample)
    # Start with a nearly deterministic posterior: at the default std of 1 the sampling noise
    # drowns the detail of young latents, and the tiny KL weight takes thousands of steps to lower it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = cfg.vae_initial_logvar
    vae = vae.to(device)
    total = cfg.vae_crop_steps + cfg.vae_full_steps
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, min(50, total // 10 + 1), total)
    ckpt_path = work / "vae.pt"
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start = state["step"]
        logger.info("vae: resuming at step %d/%d", start, total)
    vae.train()
    t0, running = time.time(), 0.0
    for step in range(start, total):
        g = _step_generator(cfg.seed, 1, step)
        crop = step < cfg.vae_crop_steps
        batch = cfg.vae_crop_batch if crop else cfg.vae_full_batch
        seeds = range(VAE_SEED_OFFSET + step * batch, VAE_SEED_OFFSET + (step + 1) * batch)
        scenes = _scenes(seeds, _pick_styles(batch, cfg.vae_styled_fraction, world.STYLES, g))
        images = _render(scenes)
        weight = 1 + cfg.vae_shape_weight * _shape_mask(images, scenes)
        if crop:
            size = cfg.vae_crop_size
            ys, xs = torch.randint(0, IMAGE_SIZE - size + 1, (2, batch), generator=g).tolist()
            images = torch.stack([im[:, y : y + size, x : x + size] for im, y, x in zip(images, ys, xs)])
            weight = torch.stack([w[:, y : y + size, x : x + size] for w, y, x in zip(weight, ys, xs)])
        loss = _vae_loss(vae, images.to(device), weight.to(device), cfg, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        running += loss.item()
        done = step + 1
        if done % 50 == 0 or done == total:
            logger.info("vae: step %d/%d loss %.4f (%.2f s/step)", done, total, running / 50, (time.time() - t0) / (done - start))
            running = 0.0
        if done % cfg.checkpoint_every == 0 or done == total:
            state = {"step": done, "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()}
            _atomic_save(state, ckpt_path)
    vae.eval()
    round_trip = vae_round_trip(vae, cfg.round_trip_scenes, device)
    logger.info("vae: round trip of %d clean held-out renders: %s", cfg.round_trip_scenes, round_trip)
    (work / "vae_round_trip.json").write_text(json.dumps({"scenes": cfg.round_trip_scenes, **round_trip}, indent=1) + "\n")
    tmp = final.with_name("vae.tmp")
    vae.save_pretrained(tmp)
    _give_weights_the_umask_mode(tmp)
    os.replace(tmp, final)
    logger.info("vae: done in %.1f min", (time.time() - t0) / 60)
    return vae


# ---------------------------------------------------------------------------- stage 2: latent cache


@dataclass
class LatentCache:
    """Scaled latents of the training scenes and the scenes themselves (captions are written per step)."""

    latents: torch.Tensor
    scenes: list[Scene]


@torch.no_grad()
def _posterior_means(vae: AutoencoderKL, scenes: Sequence[Scene], device: torch.device) -> torch.Tensor:
    """The VAE's posterior means of the rendered ``scenes`` (unscaled, on the CPU)."""
    return vae.encode(_render(scenes).to(device)).latent_dist.mean.cpu()


@torch.no_grad()
def cache_latents(work: Path, vae: AutoencoderKL, cfg: TinyModelConfig, device: torch.device) -> LatentCache:
    """Stage 2. Encodes ``cfg.cache_scenes`` training scenes, ``cfg.base_styled_fraction`` of them in a base style.

    A fresh VAE (scaling factor 1) gets 1 / std of the latents as its scaling factor; a VAE from ``--init``
    keeps its own, which its UNet was trained with. Latents (posterior means, unscaled, fp16) and scenes are
    written in chunks, each chunk atomically, so an interrupted cache continues where it stopped.
    """
    vae = vae.to(device).eval()
    cache_dir = work / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_chunks = math.ceil(cfg.cache_scenes / cfg.cache_chunk)
    latents, scenes = [], []
    for c in range(n_chunks):
        path = cache_dir / f"chunk_{c:03d}.pt"
        if not path.exists():
            seeds = range(c * cfg.cache_chunk, min((c + 1) * cfg.cache_chunk, cfg.cache_scenes))
            chunk_scenes = _scenes(seeds, _pick_styles(len(seeds), cfg.base_styled_fraction, world.BASE_STYLES, _step_generator(cfg.seed, 2, c)))
            chunk_latents = [
                _posterior_means(vae, chunk_scenes[i : i + 100], device).half() for i in range(0, len(chunk_scenes), 100)
            ]
            _atomic_save({"latents": torch.cat(chunk_latents), "scenes": [s.to_dict() for s in chunk_scenes]}, path)
            logger.info("cache: chunk %d/%d (%.1f min)", c + 1, n_chunks, (time.time() - t0) / 60)
        chunk = torch.load(path, weights_only=True)
        latents.append(chunk["latents"])
        scenes += [Scene.from_dict(d) for d in chunk["scenes"]]
    latents_t = torch.cat(latents).float()
    if vae.config.scaling_factor == 1.0:
        vae.register_to_config(scaling_factor=1.0 / latents_t.std().item())
    logger.info("cache: %d latents, std %.4f, scaling_factor %.5f", len(latents_t), latents_t.std().item(), vae.config.scaling_factor)
    return LatentCache(latents_t * vae.config.scaling_factor, scenes)


# ---------------------------------------------------------------------------- stage 3: UNet + text encoder


def training_captions(scenes: Sequence[Scene], seed: int, step: int) -> list[str]:
    """Free-form captions of one batch (positions and sizes sometimes left out, any order), fixed by (seed, step)."""
    rng = random.Random(f"captions:{seed}:{step}")
    return [world.caption(scene, rng) for scene in scenes]


LAYOUT_NOISE_GRIDS = (2, 4, 8)


def training_noise(shape: torch.Size, cfg: TinyModelConfig, generator: torch.Generator) -> torch.Tensor:
    """White noise plus offset noise (one random constant per channel) plus, with ``cfg.layout_noise``, smooth noise
    on coarse grids: what the UNet learns to remove, so low frequencies of the noisy latent say little at high noise."""
    noise = torch.randn(shape, generator=generator)
    noise += cfg.offset_noise * torch.randn((*shape[:2], 1, 1), generator=generator)
    if cfg.layout_noise:  # drawn only when on, so runs without it repeat exactly
        for grid in LAYOUT_NOISE_GRIDS:
            coarse = torch.randn((*shape[:2], grid, grid), generator=generator)
            noise += cfg.layout_noise * F.interpolate(coarse, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
    return noise


def training_timesteps(batch: int, timesteps: int, cfg: TinyModelConfig, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, a `cfg.high_noise_fraction` share of them redrawn from the top quarter of the schedule."""
    t = torch.randint(0, timesteps, (batch,), generator=generator)
    if cfg.high_noise_fraction:  # drawn only when on, so runs without it repeat exactly
        high = torch.rand(batch, generator=generator) < cfg.high_noise_fraction
        t[high] = torch.randint(timesteps * 3 // 4, timesteps, (int(high.sum()),), generator=generator)
    return t


SHAPE_WORD_MARGIN = 0.5  # the built-in model's shape words sit at 0.47: apart enough to draw five shapes


def shape_word_phrases(generator: torch.Generator) -> list[tuple[str, str, str]]:
    """The plain prompt of each shape in one random colour on one random background, split around the shape word."""
    colour, background = (list(world.COLORS)[i] for i in torch.randperm(len(world.COLORS), generator=generator)[:2].tolist())
    phrases = []
    for kind in world.SHAPES:
        prompt = world.plain_prompt(world.Scene((world.ShapeSpec(kind, colour, None, None),), background))
        at = prompt.index(f" {kind} ") + 1
        phrases.append((prompt[:at], kind, prompt[at + len(kind):]))
    return phrases


def shape_word_loss(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, generator: torch.Generator) -> torch.Tensor:
    """How far the shape words' outputs are more alike than `SHAPE_WORD_MARGIN` (mean over pairs; 0 when apart)."""
    return F.relu(word_cosines(text_encoder, tokenizer, shape_word_phrases(generator)) - SHAPE_WORD_MARGIN).mean()


UNKNOWN_CELL = -100  # cross_entropy's ignore_index: a cell the caption says nothing about
LAYOUT_READER_LR_SCALE = 5.0  # the reader starts from nothing and must keep up with the encoder it reads


class LayoutReader(nn.Module):
    """A training aid, never exported: nine learned cell queries attend to the text encoder's output, as the UNet's
    cross-attention reads it, and name the colour and kind of what the caption puts in each cell (or nothing)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.cells = nn.Parameter(0.1 * torch.randn(len(world.POSITIONS), width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.colour = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, len(world.COLORS) + 1))
        self.kind = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, len(world.SHAPES) + 1))

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour and kind logits per cell (N x 9 x classes; the last class is "nothing")."""
        read, _ = self.attention(self.cells.expand(len(text), -1, -1), text, text, need_weights=False)
        return self.colour(read), self.kind(read)

    def loss(self, text: torch.Tensor, colours: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the known cells of :func:`layout_targets` (zero when no cell is known)."""
        if not (colours != UNKNOWN_CELL).any():
            return text.sum() * 0.0
        colour_logits, kind_logits = self(text)
        return (F.cross_entropy(colour_logits.flatten(0, 1), colours.flatten(), ignore_index=UNKNOWN_CELL)
                + F.cross_entropy(kind_logits.flatten(0, 1), kinds.flatten(), ignore_index=UNKNOWN_CELL))


def layout_targets(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What each caption puts in each cell (N x 9, cells in `world.POSITIONS` order), as colour and kind indices:
    the named shape's; "nothing" (the last index) in the other cells when the caption names every shape's cell;
    `UNKNOWN_CELL` where it does not say (a shape without a cell, a caption that is not a scene)."""
    colour_names = list(world.COLORS)
    colours = torch.full((len(captions), len(world.POSITIONS)), UNKNOWN_CELL)
    kinds = colours.clone()
    for row, text in enumerate(captions):
        try:
            shapes = parse_prompt(text).shapes
        except UserInputError:
            continue
        if all(shape.position is not None for shape in shapes):
            colours[row], kinds[row] = len(world.COLORS), len(world.SHAPES)
        for shape in shapes:
            if shape.position is not None:
                cell = world.POSITIONS.index(shape.position)
                colours[row, cell], kinds[row, cell] = colour_names.index(shape.color), world.SHAPES.index(shape.kind)
    return colours, kinds


class ShapeMapReader(nn.Module):
    """A training aid, never exported: reads the UNet's decoder features (the output of ``up_blocks[1]``, half the
    latent's grid: 16 x 16 on the x4 latent) and names, at each place, the kind of shape there (or background) and
    its colour (the background's where no shape is), so the features must carry what the text and the latent say is
    where."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU())
        self.kind = nn.Conv2d(width, len(world.SHAPES) + 1, 1)
        self.colour = nn.Conv2d(width, len(world.COLORS), 1)

    def loss(self, features: torch.Tensor, kinds: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the soft maps of :func:`shape_maps` (N x classes x the features' grid)."""
        read = self.body(features)
        return F.cross_entropy(self.kind(read), kinds) + F.cross_entropy(self.colour(read), colours)


def shape_maps(scenes: Sequence[Scene], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What each scene has at each place of a ``size`` x ``size`` grid, as the share of the cell's pixels: kinds
    (N x (shapes + 1) x size x size, the last one background) and colours (N x colours x size x size). Drawn in the
    renderer's order and geometry at 4 px per cell, without the style (a styled scene keeps its shapes)."""
    colour_names = list(world.COLORS)
    pixels = 4 * size
    kind_index = np.empty((len(scenes), pixels, pixels), np.int64)
    colour_index = np.empty_like(kind_index)
    for row, scene in enumerate(scenes):
        kind_index[row] = len(world.SHAPES)
        colour_index[row] = colour_names.index(scene.background)
        for spec, (cx, cy, d) in zip(scene.shapes, world.shape_geometry(scene, pixels)):
            inside = world.shape_alpha(spec.kind, cx, cy, d, pixels, pixels) > 127
            kind_index[row][inside] = world.SHAPES.index(spec.kind)
            colour_index[row][inside] = colour_names.index(spec.color)

    def shares(index: np.ndarray, classes: int) -> torch.Tensor:
        one_hot = F.one_hot(torch.from_numpy(index), classes).permute(0, 3, 1, 2).float()
        return F.avg_pool2d(one_hot, 4)

    return shares(kind_index, len(world.SHAPES) + 1), shares(colour_index, len(colour_names))


def shapes_moved_to_the_first_step(first_step: torch.Tensor, scenes: Sequence[Scene]) -> list[Scene]:
    """Each one-shape scene with its shape moved to the grid cell where ``first_step`` (the model's clean latent for
    the scene's plain prompt) stands out most from its background (each channel's median)."""
    background = first_step.flatten(2).median(dim=2).values[..., None, None]
    return _shapes_moved_to_highest_cells(F.adaptive_avg_pool2d((first_step - background).pow(2).sum(dim=1, keepdim=True), 3), scenes)


def shapes_moved_to_the_noise(noise: torch.Tensor, scenes: Sequence[Scene]) -> list[Scene]:
    """Each one-shape scene with its shape moved to the grid cell where ``noise`` (summed over channels) is highest."""
    return _shapes_moved_to_highest_cells(F.adaptive_avg_pool2d(noise.sum(dim=1, keepdim=True), 3), scenes)


def _shapes_moved_to_highest_cells(cell_scores: torch.Tensor, scenes: Sequence[Scene]) -> list[Scene]:
    """Each one-shape scene with its shape moved to its highest-scoring cell of ``cell_scores`` (N x 1 x 3 x 3),
    among the cells whose combination is not held out (the move must not teach a held-out prompt)."""
    moved = []
    for scene, per_cell in zip(scenes, cell_scores.flatten(1).tolist()):  # cells in row-major order, as world.POSITIONS
        (shape,) = scene.shapes
        allowed = [
            i for i, cell in enumerate(world.POSITIONS)
            if not world.is_held_out(shape.color, shape.kind, scene.background, cell)
        ]
        cell = world.POSITIONS[max(allowed, key=per_cell.__getitem__)]
        moved.append(replace(scene, shapes=(replace(shape, position=cell),)))
    return moved


def scene_with_one_cell_last(scene: Scene, index: int) -> Scene:
    """``scene`` for its caption: shape ``index`` moved last and the only one with its cell named (a scene of one
    shape stays as it is)."""
    if len(scene.shapes) == 1:
        return scene
    others = tuple(replace(shape, position=None) for i, shape in enumerate(scene.shapes) if i != index)
    return replace(scene, shapes=others + (scene.shapes[index],))


def _scenes_of_at_most(cache: LatentCache, shapes: int, field: str) -> torch.Tensor:
    """Indices of the cached scenes that hold at most ``shapes`` shapes; ``field`` is the setting that asks for them."""
    indices = torch.tensor([i for i, scene in enumerate(cache.scenes) if len(scene.shapes) <= shapes], dtype=torch.long)
    if not len(indices):
        raise UserInputError(f"{field} needs scenes of at most {shapes} shape(s) in the latent cache; it holds none")
    return indices


@torch.no_grad()
def guided_prediction(
    unet: UNet2DConditionModel,
    latent: torch.Tensor,
    timestep: int,
    text: torch.Tensor,
    empty_text: torch.Tensor,
    scheduler: DDIMScheduler,
    guidance: float = EVAL_GUIDANCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a v-prediction model predicts from ``latent`` at ``timestep``, with
    classifier-free guidance as sampling applies it."""
    timesteps = torch.full((len(latent),), timestep, device=latent.device)
    v_text = unet(latent, timesteps, text).sample
    v_empty = unet(latent, timesteps, empty_text.expand_as(text)).sample
    v = v_empty + guidance * (v_text - v_empty)
    alpha_bar = scheduler.alphas_cumprod[timestep].to(latent.device)
    return alpha_bar.sqrt() * latent - (1 - alpha_bar).sqrt() * v, alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * latent


def first_step_clean_latent(
    unet: UNet2DConditionModel,
    noise: torch.Tensor,
    text: torch.Tensor,
    empty_text: torch.Tensor,
    scheduler: DDIMScheduler,
    guidance: float = EVAL_GUIDANCE,
) -> torch.Tensor:
    """The clean latent a v-prediction model predicts from pure ``noise`` at the last timestep, with classifier-free
    guidance as sampling applies it: what the first sampling step hands to the second."""
    last = scheduler.config.num_train_timesteps - 1
    return guided_prediction(unet, noise, last, text, empty_text, scheduler, guidance)[0]


def sampler_timesteps(scheduler: DDIMScheduler, steps: int = EVAL_STEPS) -> list[int]:
    """The timesteps ``scheduler``'s sampling visits in ``steps`` steps (999, 949, ... for 20 trailing ones)."""
    sampler = copy.deepcopy(scheduler)
    sampler.set_timesteps(steps)
    return sampler.timesteps.tolist()


def sampled_latent(
    unet: UNet2DConditionModel,
    first_step: torch.Tensor,
    noise: torch.Tensor,
    text: torch.Tensor,
    empty_text: torch.Tensor,
    scheduler: DDIMScheduler,
    visited: Sequence[int],
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The latent the model's own guided DDIM sampling from pure ``noise`` reaches after the steps at ``visited``
    (the first of :func:`sampler_timesteps`), put at ``timesteps`` (one per row) as DDIM puts it; ``first_step`` is
    the first step's clean latent (:func:`first_step_clean_latent`). One step gives ``scheduler.add_noise(first_step,
    noise, timesteps)``: at zero SNR the first step's noise prediction is its input."""
    clean, predicted_noise = first_step, noise
    for timestep in visited[1:]:
        latent = scheduler.add_noise(clean, predicted_noise, torch.tensor(timestep))
        clean, predicted_noise = guided_prediction(unet, latent, timestep, text, empty_text, scheduler)
    return scheduler.add_noise(clean, predicted_noise, timesteps)


def train_unet(
    work: Path,
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    cache: LatentCache,
    cfg: TinyModelConfig,
    device: torch.device,
) -> None:
    """Stage 3: UNet and text encoder jointly (epsilon, or v with `zero_terminal_snr`; Min-SNR-gamma, offset noise,
    caption dropout), resumable.

    Starts from ``unet`` and ``text_encoder`` as given (fresh, or from ``--init``). The EMA weights are
    exported to ``out`` and scored at the end (and every ``cfg.eval_every`` steps when that is set).
    """
    checkpoint = work / "unet.pt"
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=cfg.ema_decay, min_decay=0.0, foreach=True)
    groups = [
        {"params": list(unet.parameters())},
        {"params": list(text_encoder.parameters()), "lr": cfg.unet_lr * cfg.text_lr_scale},
    ]
    reader = None
    if cfg.layout_loss_weight:
        with torch.random.fork_rng(devices=[]):  # its own draw: the reader never changes another part's weights
            torch.manual_seed(cfg.seed + 3)
            reader = LayoutReader(text_encoder.config.hidden_size).to(device)
        groups.append({"params": list(reader.parameters()), "lr": cfg.unet_lr * LAYOUT_READER_LR_SCALE})
    map_reader, decoder_features, features_hook = None, {}, None
    if cfg.shape_map_loss_weight:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 4)
            map_reader = ShapeMapReader(unet.config.block_out_channels[-2]).to(device)
        groups.append({"params": list(map_reader.parameters())})
        # Kept for the training step's own UNet call; the first-step calls before it write here too and are replaced.
        features_hook = unet.up_blocks[1].register_forward_hook(
            lambda module, args, output: decoder_features.update(features=output)
        )
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=1e-2)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg.unet_warmup, cfg.unet_steps)
    scheduler = build_scheduler(cfg.zero_terminal_snr)
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        if reader is not None:
            reader.load_state_dict(state["layout_reader"])
        if map_reader is not None:
            map_reader.load_state_dict(state["shape_map_reader"])
        start = state["step"]
        logger.info("unet: resuming at step %d/%d", start, cfg.unet_steps)
    empty_ids = tokenize(tokenizer, [""])[0]
    shape_weight = None
    if cfg.unet_shape_weight:  # once per run, not per step: rendering the batch's scenes cost ~10 % of a step
        shape_weight = torch.cat([
            _latent_shape_weight(cache.scenes[i : i + 500], cache.latents.shape[-2:], cfg.unet_shape_weight)
            for i in range(0, len(cache.scenes), 500)
        ])
    map_size = cache.latents.shape[-1] // 2  # up_blocks[1] ends with the second of three upsamplings
    if map_reader is not None:  # once per run, as the shape weight
        maps = [shape_maps(cache.scenes[i : i + 500], map_size) for i in range(0, len(cache.scenes), 500)]
        kind_maps = torch.cat([kinds for kinds, _ in maps]).half()
        colour_maps = torch.cat([colours for _, colours in maps]).half()
        del maps
    shared_positioned = round(cfg.position_fraction * cfg.unet_batch)
    shared_plain = round(cfg.plain_rollout_fraction * cfg.unet_batch)
    if shared_plain:
        one_shape = _scenes_of_at_most(cache, 1, "plain_rollout_fraction")
        vae = vae.to(device).eval()
    visited = sampler_timesteps(scheduler)  # the sampler's own steps, for rollouts over more than the first
    if shared_positioned:  # scenes of few shapes for that share of each batch (their canonical caption names every cell)
        few_shapes = _scenes_of_at_most(cache, cfg.position_shapes, "position_fraction")
    shares_from = round(cfg.layout_shares_from * cfg.unet_steps)
    unet.train()
    text_encoder.train()
    t0, running, running_layout, running_map, running_words = time.time(), 0.0, 0.0, 0.0, 0.0
    for step in range(start, cfg.unet_steps):
        g = _step_generator(cfg.seed, 3, step)
        positioned, plain = (shared_positioned, shared_plain) if step >= shares_from else (0, 0)
        free = cfg.unet_batch - positioned - plain  # batch order: free captions, positioned, plain
        started = free if cfg.position_rollout else free + positioned  # rows from here on start from the first step
        idx = torch.randint(0, len(cache.latents), (cfg.unet_batch,), generator=g)
        if positioned:  # drawn only when on, so runs without it repeat exactly
            idx[free : free + positioned] = few_shapes[torch.randint(0, len(few_shapes), (positioned,), generator=g)]
        if plain:
            idx[free + positioned :] = one_shape[torch.randint(0, len(one_shape), (plain,), generator=g)]
        x0 = cache.latents[idx]
        scenes = [cache.scenes[i] for i in idx.tolist()]
        positioned_scenes = scenes[free : free + positioned]
        if cfg.position_cell_last_fraction:  # drawn only when on, so runs without it repeat exactly
            chosen = torch.rand(positioned, generator=g) < cfg.position_cell_last_fraction
            which = torch.rand(positioned, generator=g).tolist()  # x the number of shapes: the one named last
            positioned_scenes = [
                scene_with_one_cell_last(scene, int(which[i] * len(scene.shapes))) if chosen[i] else scene
                for i, scene in enumerate(positioned_scenes)
            ]
        captions = (
            training_captions(scenes[:free], cfg.seed, step)
            + [world.caption(scene) for scene in positioned_scenes]
            + [world.plain_prompt(scene) for scene in scenes[free + positioned :]]
        )
        ids = tokenize(tokenizer, captions)
        dropped = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        ids[dropped] = empty_ids
        noise = training_noise(x0.shape, cfg, g)
        if plain and cfg.plain_cell_from_noise:  # drawn only when on, so runs without it repeat exactly
            noise[-plain:] = training_noise(x0[-plain:].shape, replace(cfg, layout_noise=0.0), g)
        t = training_timesteps(cfg.unet_batch, scheduler.config.num_train_timesteps, cfg, g)
        t[free:] = scheduler.config.num_train_timesteps - 1
        if cfg.position_timesteps > 1:  # drawn only when on, so runs without it repeat exactly
            t[free:] -= torch.randint(0, cfg.position_timesteps, (cfg.unet_batch - free,), generator=g)
        rollout_steps = 1
        if cfg.position_rollout_steps > 1:  # drawn only when on, so runs without it repeat exactly
            rollout_steps = int(torch.randint(1, cfg.position_rollout_steps + 1, (1,), generator=g))
            below_last = scheduler.config.num_train_timesteps - 1 - visited[rollout_steps - 1]
            t[free : free + positioned] = (t[free : free + positioned] - below_last).clamp(min=0)
        noisy = scheduler.add_noise(x0, noise, t)
        text = text_encoder(ids.to(device))[0]
        pixel_weight = shape_weight[idx] if shape_weight is not None else None
        if map_reader is not None:
            scene_kinds, scene_colours = kind_maps[idx], colour_maps[idx]
        if started < cfg.unet_batch:
            with torch.no_grad():  # the guided first step only reads the encoder: no graph to build
                empty_text = text_encoder(empty_ids[None].to(device))[0]
            first_step = first_step_clean_latent(
                unet, noise[started:].to(device), text[started:].detach(), empty_text, scheduler
            ).cpu()
            if plain:
                moved = (shapes_moved_to_the_noise(noise[-plain:], scenes[-plain:]) if cfg.plain_cell_from_noise
                         else shapes_moved_to_the_first_step(first_step[-plain:], scenes[-plain:]))
                x0[-plain:] = _posterior_means(vae, moved, device) * vae.config.scaling_factor
                if map_reader is not None:
                    kinds, colours = shape_maps(moved, map_size)
                    scene_kinds[-plain:], scene_colours[-plain:] = kinds.half(), colours.half()
                if pixel_weight is not None:
                    pixel_weight[-plain:] = _latent_shape_weight(moved, x0.shape[-2:], cfg.unet_shape_weight)
            noisy[started:] = scheduler.add_noise(first_step, noise[started:], t[started:])
            if rollout_steps > 1:  # the positioned rows (the first of the started ones) sample on
                rows = slice(free, free + positioned)
                noisy[rows] = sampled_latent(
                    unet, first_step[:positioned].to(device), noise[rows].to(device), text[rows].detach(), empty_text,
                    scheduler, visited[:rollout_steps], t[rows].to(device),
                ).cpu()
            # The noise that takes the scene to that latent: the v target below then asks for the scene.
            alpha_bar = scheduler.alphas_cumprod[t[started:]].view(-1, 1, 1, 1)
            noise[started:] = (noisy[started:] - alpha_bar.sqrt() * x0[started:]) / (1 - alpha_bar).sqrt()
        pred = unet(noisy.to(device), t.to(device), text).sample
        snr = compute_snr(scheduler, t)
        if cfg.zero_terminal_snr:
            target = scheduler.get_velocity(x0, noise, t)
            # The v error is (SNR + 1) x the clean-image error; clamped at gamma like Min-SNR, but 1 (not Min-SNR's
            # 0) at zero SNR, where the text alone must give the layout.
            weight = (torch.clamp(snr + 1, max=cfg.min_snr_gamma) / (snr + 1)).to(device)
        else:
            target = noise
            weight = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).to(device)  # Min-SNR-gamma for epsilon
        error = (pred - target.to(device)).pow(2)
        if pixel_weight is not None:
            pixel_weight = pixel_weight.to(device)
            per_sample = (pixel_weight * error).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))
        else:
            per_sample = error.mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        running += loss.item()
        if reader is not None:
            colours, kinds = layout_targets(captions)
            colours[dropped], kinds[dropped] = UNKNOWN_CELL, UNKNOWN_CELL
            layout_loss = reader.loss(text, colours.to(device), kinds.to(device))
            running_layout += layout_loss.item()
            loss = loss + cfg.layout_loss_weight * layout_loss
        # Rows without a caption are left out: at high noise nothing says what is where.
        if map_reader is not None and (kept := ~dropped.to(device)).any():
            map_loss = map_reader.loss(
                decoder_features["features"][kept],
                scene_kinds.to(device)[kept].float(),
                scene_colours.to(device)[kept].float(),
            )
            running_map += map_loss.item()
            loss = loss + cfg.shape_map_loss_weight * map_loss
        if cfg.shape_word_loss_weight:  # drawn only when on, so runs without it repeat exactly
            word_loss = shape_word_loss(text_encoder, tokenizer, g)
            running_words += word_loss.item()
            loss = loss + cfg.shape_word_loss_weight * word_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        done = step + 1
        if done % 10 == 0 or done == cfg.unet_steps:
            logged = 10 if done % 10 == 0 else done % 10
            logger.info(
                "unet: step %d/%d loss %.4f%s%s%s lr %.2e (%.2f s/step)",
                done, cfg.unet_steps, running / logged,
                f" (layout reader {running_layout / logged:.4f})" if reader is not None else "",
                f" (shape-map reader {running_map / logged:.4f})" if map_reader is not None else "",
                f" (shape words {running_words / logged:.4f})" if cfg.shape_word_loss_weight else "",
                lr_schedule.get_last_lr()[0], (time.time() - t0) / (done - start),
            )
            running, running_layout, running_map, running_words = 0.0, 0.0, 0.0, 0.0
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            state = {
                "step": done, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(), "ema": ema.state_dict(),
            }
            if reader is not None:
                state["layout_reader"] = reader.state_dict()
            if map_reader is not None:
                state["shape_map_reader"] = map_reader.state_dict()
            _atomic_save(state, checkpoint)
        if cfg.eval_every and cfg.eval_prompts and done % cfg.eval_every == 0 and done < cfg.unet_steps:
            export(out, vae, tokenizer, unet, text_encoder, params, ema, scheduler, device)
            evaluate_export(out, cfg.eval_prompts, work, f"unet-step{done}")
            unet.train()
            text_encoder.train()
    if features_hook is not None:
        features_hook.remove()
    logger.info("unet: done (%.1f min this run)", (time.time() - t0) / 60)
    # Outside the loop, so rerunning a finished run exports and scores again.
    export(out, vae, tokenizer, unet, text_encoder, params, ema, scheduler, device)
    if cfg.eval_prompts:
        evaluate_export(out, cfg.eval_prompts, work, f"unet-step{cfg.unet_steps}")


def export(
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    params: list[torch.nn.Parameter],
    ema: EMAModel,
    scheduler: DDIMScheduler,
    device: torch.device,
) -> None:
    """Save the pipeline with the EMA weights (fp16) to ``out``; the live weights are restored."""
    ema.store(params)
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    save_pipeline_fp16(assemble_pipeline(vae.to(device), text_encoder, tokenizer, unet, scheduler), out)
    ema.restore(params)
    logger.info("export: %s (%.1f MB)", out, folder_size_bytes(out) / 1e6)


# ---------------------------------------------------------------------------- eval


def evaluate_export(out: Path, n: int, work: Path, tag: str) -> None:
    """Score the exported folder as `python -m scedit_ui eval adherence` does (DDIM, 20 steps, guidance 5), both prompt sets."""
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int) -> Image.Image:
        # Noise from a CPU generator, as the app makes it, so scores match `scedit_ui eval adherence`.
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, num_inference_steps=EVAL_STEPS, guidance_scale=EVAL_GUIDANCE, generator=generator).images[0]

    similarity = {"shape_word_similarity": shape_word_similarity(pipe.text_encoder, pipe.tokenizer),
                  "position_word_similarity": position_word_similarity(pipe.text_encoder, pipe.tokenizer),
                  "layout_from_text": layout_from_text(pipe),
                  "layout_from_text_blank": layout_from_text(pipe, decoy=False)}
    for prompts in PROMPT_SETS:
        report = evaluate_adherence(generate, n, seed=EVAL_SEED, prompts=prompts)
        logger.info("eval %s %s: %s, shape-word similarity %.3f, position-word similarity %.3f, layout from text %.3f "
                    "(blank latent %.3f)", tag, prompts, report.to_dict(), *similarity.values())
        with open(work / "eval.jsonl", "a") as f:
            f.write(json.dumps({"tag": tag, "steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE, **report.to_dict(),
                                **similarity}) + "\n")


def shape_word_similarity(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> float:
    """Mean cosine similarity of the text encoder's outputs at the shape word of "a blue <shape> on a white
    background" between the five shapes: near 1 means the UNet cannot tell the shapes apart, whatever it learns."""
    return _word_similarity(text_encoder, tokenizer, [("a blue ", shape, " on a white background") for shape in world.SHAPES])


def position_word_similarity(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> float:
    """As `shape_word_similarity`, at the last word of the position in "a blue circle at the <position> on a white
    background" (as captions name it), between the nine positions."""
    phrases = [("a blue circle ", world.position_phrase(p), " on a white background") for p in world.POSITIONS]
    return _word_similarity(text_encoder, tokenizer, phrases)


# The first of 20 DDIM steps on SD's schedule, where the layout of a picture is decided (with `zero_terminal_snr`
# the first step is 999; 951 keeps the measure comparable across both).
LAYOUT_PROBE_TIMESTEP = 951


@torch.no_grad()
def layout_from_text(
    pipe: StableDiffusionPipeline, timestep: int = LAYOUT_PROBE_TIMESTEP, seeds: int = 16, decoy: bool = True
) -> float:
    """Whether the prompt decides where a shape goes at ``timestep``, or the noisy latent does.

    The latent is a red circle in the center (``decoy``) or a plain white picture, noised to ``timestep`` (``seeds``
    noise draws); the prompt puts a red circle in one of the eight other cells. Returns the share of the predicted
    clean image's redness (mean over the draws) that lies in the prompt's cell, averaged over the eight: near 1 when
    the model places the shape by the prompt, 1/9 when it spreads it evenly (it does not know where the prompt puts
    it), near 0 with the decoy when it follows the faint circle left in the latent.
    """
    unet, vae, device = pipe.unet, pipe.vae, pipe.unet.device
    alpha_bar = pipe.scheduler.alphas_cumprod[timestep]
    if decoy:
        pixels = _render([world.Scene((world.ShapeSpec("circle", "red", "center", "medium"),), "white")])
    else:
        white = torch.tensor(world.COLORS["white"], dtype=torch.float32) / 127.5 - 1.0
        pixels = white[None, :, None, None].expand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    pixels = pixels.to(device, vae.dtype)
    latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn((seeds, *latent.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device, latent.dtype)
    noisy = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
    shares = []
    for position in world.POSITIONS:
        if position == "center":
            continue
        prompt = f"a red circle {world.position_phrase(position)} on a white background"
        text = pipe.text_encoder(tokenize(pipe.tokenizer, [prompt]).to(device))[0].expand(seeds, -1, -1)
        output = unet(noisy, timestep, text).sample
        if pipe.scheduler.config.prediction_type == "v_prediction":
            clean = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * output
        else:
            clean = (noisy - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
        clean = clean.mean(0, keepdim=True)
        image = vae.decode(clean / vae.config.scaling_factor).sample[0].float().clamp(-1, 1)
        redness = (image[0] - image[1:].mean(0)).clamp(min=0)  # 0 on the white background
        size = redness.shape[-1] // 3 * 3
        cells = redness[:size, :size].reshape(3, size // 3, 3, size // 3).sum((1, 3))
        row, column = divmod(world.POSITIONS.index(position), 3)
        shares.append(float(cells[row, column] / cells.sum()))
    return float(np.mean(shares))


def word_cosines(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, phrases: list[tuple[str, str, str]]) -> torch.Tensor:
    """Cosine similarity of the encoder's outputs at the last token of each phrase's middle part, for every ordered
    pair of different phrases (a flat tensor; each pair twice)."""
    ids = tokenize(tokenizer, ["".join(phrase) for phrase in phrases]).to(text_encoder.device)
    # <bos>, the tokens of "before + word", <eos>: the word's last token sits at that count minus 2.
    last = [len(tokenizer(before + word).input_ids) - 2 for before, word, _ in phrases]
    at_word = F.normalize(text_encoder(ids)[0][torch.arange(len(phrases)), last].float(), dim=-1)
    different = ~torch.eye(len(phrases), dtype=torch.bool, device=at_word.device)
    return (at_word @ at_word.T)[different]


@torch.no_grad()
def _word_similarity(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, phrases: list[tuple[str, str, str]]) -> float:
    """Mean pairwise cosine similarity of the encoder's outputs at the last token of each phrase's middle part."""
    return float(word_cosines(text_encoder, tokenizer, phrases).mean())


# ---------------------------------------------------------------------------- all stages


# What a run stamped before a field existed did, for fields whose default is not that.
BEFORE_FIELD_EXISTED = {"shape_map_loss_weight": 0.0, "shape_word_loss_weight": 0.0, "layout_shares_from": 0.0}


def _claim_work_folder(work: Path, cfg: TinyModelConfig) -> Path:
    """``work``, created and stamped with ``cfg``; a folder of a run with another configuration is refused."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    # A field added since the folder was stamped had its default value in that run, or the value it stood for then.
    defaults = {f.name: f.default for f in fields(TinyModelConfig)} | BEFORE_FIELD_EXISTED
    if config_path.exists() and {**defaults, **json.loads(config_path.read_text())} != asdict(cfg):
        raise UserInputError(f"{work} holds a run with a different configuration; use another --work folder.")
    config_path.write_text(json.dumps(asdict(cfg), indent=1))
    return work


def _load_init(init: Path) -> StableDiffusionPipeline:
    if not (Path(init) / "model_index.json").exists():
        raise UserInputError(f"--init {init}: not a diffusers model folder (no model_index.json).")
    return StableDiffusionPipeline.from_pretrained(init, dtype=torch.float32, safety_checker=None)


def _load_matching_weights(unet: UNet2DConditionModel, source: UNet2DConditionModel) -> None:
    """Copy ``source``'s weights into ``unet`` wherever this recipe's layout has the same module.

    An init folder trained with another layout (the x4 candidate had attention at 32 x 32) keeps everything
    else; modules only one side has are dropped or start fresh, and both are logged.
    """
    result = unet.load_state_dict(source.state_dict(), strict=False)
    if result.unexpected_keys:
        logger.info("--init: %d tensors of the init UNet have no place in this layout (dropped), e.g. %s",
                    len(result.unexpected_keys), result.unexpected_keys[0])
    if result.missing_keys:
        logger.info("--init: %d tensors of this layout start fresh, e.g. %s",
                    len(result.missing_keys), result.missing_keys[0])


STAGES = ("vae", "cache", "unet")


def train(
    work: Path, out: Path, cfg: TinyModelConfig = TinyModelConfig(), threads: int = 2, until: str = "unet"
) -> None:
    """Run (or resume) every stage up to ``until``; the tokenizer is ``cfg.init``'s, else ``out``'s (see `_out_folder_tokenizer`).

    ``until="vae"`` trains and scores only the autoencoder: the way to compare latent sizes before paying for a UNet.
    """
    if cfg.position_fraction and not cfg.zero_terminal_snr:
        raise UserInputError("position_fraction needs zero_terminal_snr: only then does the last timestep hide the layout")
    if cfg.position_rollout and not cfg.position_fraction:
        raise UserInputError("position_rollout needs position_fraction: it changes how that share of each batch starts")
    for name in ("layout_loss_weight", "shape_map_loss_weight", "shape_word_loss_weight"):
        if getattr(cfg, name) < 0:
            raise UserInputError(f"{name} must be 0 (off) or positive, got {getattr(cfg, name)}")
    if cfg.position_cell_last_fraction and not cfg.position_fraction:
        raise UserInputError("position_cell_last_fraction needs position_fraction: it captions part of that share")
    if not 1 <= cfg.position_rollout_steps <= EVAL_STEPS:
        raise UserInputError(f"position_rollout_steps must be between 1 and {EVAL_STEPS}, got {cfg.position_rollout_steps}")
    if cfg.position_rollout_steps > 1 and not cfg.position_rollout:
        raise UserInputError("position_rollout_steps needs position_rollout: it continues that share's sampling")
    if cfg.plain_rollout_fraction and not cfg.zero_terminal_snr:
        raise UserInputError("plain_rollout_fraction needs zero_terminal_snr: it starts from the first step of pure noise")
    if cfg.plain_cell_from_noise and not cfg.plain_rollout_fraction:
        raise UserInputError("plain_cell_from_noise needs plain_rollout_fraction: it chooses the cell of that share's shapes")
    if cfg.position_fraction + cfg.plain_rollout_fraction > 1:
        raise UserInputError("position_fraction and plain_rollout_fraction share one batch: together at most 1")
    if not 0 <= cfg.layout_shares_from < 1:
        raise UserInputError(f"layout_shares_from is a fraction of unet_steps, at least 0 and below 1, got {cfg.layout_shares_from}")
    timesteps = scheduler_config()["num_train_timesteps"]
    if not 1 <= cfg.position_timesteps <= timesteps:
        raise UserInputError(f"position_timesteps must be between 1 and {timesteps}, got {cfg.position_timesteps}")
    if cfg.latent_downsample not in (4, 8):
        raise UserInputError(f"latent_downsample must be 4 or 8, got {cfg.latent_downsample}")
    init = _load_init(Path(cfg.init)) if cfg.init else None
    if init is not None:
        tokenizer = init.tokenizer
        # The VAE (and so the latent size) of the init folder is kept: its UNet was trained on its latents.
        cfg = replace(cfg, latent_channels=init.vae.config.latent_channels,
                      latent_downsample=2 ** (len(init.vae.config.block_out_channels) - 1))
    else:
        tokenizer = _out_folder_tokenizer(Path(out))
    work = _claim_work_folder(work, cfg)
    device = training_device(threads)
    logger.info("training on %s (%d CPU threads) with %s", device, torch.get_num_threads(), cfg)
    t0 = time.time()
    vae = init.vae if init is not None else train_vae(work, cfg, device)
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg.latent_channels, cfg.latent_downsample)
    if init is not None:
        _load_matching_weights(unet, init.unet)
        text_encoder = init.text_encoder
    else:
        text_encoder = build_text_encoder()
    if until == "vae":  # with --init the VAE is the init folder's: nothing more to do
        return
    t1 = time.time()
    cache = cache_latents(work, vae, cfg, device)
    if until == "cache":
        return
    t2 = time.time()
    train_unet(work, Path(out), vae, tokenizer, unet, text_encoder, cache, cfg, device)
    logger.info(
        "all stages done: vae %.1f min, cache %.1f min, unet %.1f min (this run)",
        (t1 - t0) / 60, (t2 - t1) / 60, (time.time() - t2) / 60,
    )


def _out_folder_tokenizer(out: Path) -> CLIPTokenizer:
    """The tokenizer in ``out/tokenizer``; a new folder gets the built-in model's (CLIP's vocabulary, the same for any run)."""
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists():
        if not (BUILTIN_MODEL / "tokenizer" / "vocab.json").exists():
            raise UserInputError(
                f"No tokenizer in {tokenizer_dir} nor in {BUILTIN_MODEL}. Build it first: python -m scedit_ui.shapes.tiny_model "
                f"build-tokenizer --bpe-vocab PATH/bpe_simple_vocab_16e6.txt.gz --out {out}"
            )
        logger.info("copying the built-in model's tokenizer to %s", tokenizer_dir)
        shutil.copytree(BUILTIN_MODEL / "tokenizer", tokenizer_dir)
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def _parse_overrides(items: Sequence[str]) -> dict:
    """``name=value`` pairs for :class:`TinyModelConfig`, each value converted to the field's type."""
    types = {f.name: f.type for f in fields(TinyModelConfig)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise UserInputError(f"--set {item!r}: write name=value with a TinyModelConfig field ({', '.join(types)}).")
        kind = types[name]
        try:
            if value == "" and "None" in str(kind):
                out[name] = None
            elif kind in ("bool", bool):
                out[name] = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            else:
                out[name] = int(value) if kind in ("int", int) else float(value) if kind in ("float", float) else value
        except (KeyError, ValueError) as e:
            raise UserInputError(f"--set {item!r}: {value!r} is not a value of type {kind}.") from e
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scedit_ui.shapes.tiny_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_tok = sub.add_parser("build-tokenizer", help="build the CLIP tokenizer into OUT/tokenizer")
    p_tok.add_argument("--bpe-vocab", type=Path, required=True, help="bpe_simple_vocab_16e6.txt.gz (from open-clip-torch)")
    p_tok.add_argument("--out", type=Path, default=BUILTIN_MODEL)
    p_train = sub.add_parser("train", help="train (or resume) all stages")
    p_train.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints, caches, train.log and eval.jsonl")
    p_train.add_argument("--out", type=Path, default=BUILTIN_MODEL)
    p_train.add_argument("--init", type=Path, help="start the UNet and text encoder from this model folder, keep its VAE")
    p_train.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a TinyModelConfig field")
    p_train.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy shared CPU)")
    p_train.add_argument("--until", choices=STAGES, default="unet", help="stop after this stage (vae: measure the latent)")
    p_score = sub.add_parser("score-vae", help="score the VAE round trip of a model folder (or a VAE folder)")
    p_score.add_argument("folder", type=Path, help="a diffusers model folder, or its vae/ folder")
    p_score.add_argument("--n", type=int, default=100, help="held-out scenes (a quarter of them per style)")
    args = parser.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.command == "train":
        args.work.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.work / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    try:
        if args.command == "build-tokenizer":
            build_clip_tokenizer(args.bpe_vocab, args.out / "tokenizer")
        elif args.command == "score-vae":
            folder = args.folder / "vae" if (args.folder / "vae" / "config.json").exists() else args.folder
            if not (folder / "config.json").exists():
                raise UserInputError(f"{args.folder}: no VAE there (no config.json, nor vae/config.json).")
            vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32)
            print(json.dumps({"scenes": args.n, **vae_round_trip(vae, args.n, training_device())}, indent=1))
        else:
            overrides = _parse_overrides(args.set)
            if args.init is not None:
                overrides["init"] = str(args.init)
            train(args.work, args.out, replace(TinyModelConfig(), **overrides), threads=args.threads, until=args.until)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
