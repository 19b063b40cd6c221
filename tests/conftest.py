"""Shared fixtures: small random-weight UNets with Stable Diffusion block structure, on CPU."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

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
