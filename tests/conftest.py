"""Shared fixtures: small random-weight UNets with Stable Diffusion block structure, on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One thread: the test models are tiny, and OpenMP threads spinning against a busy core (CI neighbours,
# a training job) slow such small ops down by 10x. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> ARGS` run as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


# SD 1.5 block types and skip pattern (12 skips, downsamples at g = 3, 6, 9) at a tiny width.
TINY_SD_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=4,
)


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SD_UNET_CONFIG).eval()


@pytest.fixture
def unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
    }


TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd" / "tokenizer"


def build_random_sd_pipeline() -> StableDiffusionPipeline:
    """A complete Stable Diffusion pipeline with random weights: 64 px images, 8×8 latents."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD_UNET_CONFIG)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16, vocab_size=49408)
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def random_sd_folder(tmp_path_factory) -> Path:
    """A diffusers Stable Diffusion folder on disk (random weights), loadable like a real one."""
    folder = tmp_path_factory.mktemp("random-sd")
    build_random_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def manager(random_sd_folder):
    """A ModelManager on the random tiny SD folder, shared by a test module."""
    from scedit_ui.model_manager import ModelManager

    manager = ModelManager("cpu")
    manager.load(str(random_sd_folder))
    return manager
