"""The UNet configs of the real base models (from their `unet/config.json`), for layouts and counting.

Build them on the meta device: shapes without weights, nothing downloaded.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
)

REFERENCE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(_SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(
        _SD_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
    ),
    "sdxl": dict(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280],
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        sample_size=128,
        cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
ARCHITECTURES = tuple(REFERENCE_UNET_CONFIGS)


def build_meta_unet(architecture: str) -> UNet2DConditionModel:
    """The real UNet of `architecture` with shapes only (meta device): for layouts and parameter counts."""
    if architecture not in REFERENCE_UNET_CONFIGS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    with torch.device("meta"):
        return UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[architecture])


def guess_architecture(config: Any) -> str:
    """Name the reference architecture a UNet config matches, or 'custom'."""
    for name, reference in REFERENCE_UNET_CONFIGS.items():
        if all(_same(config.get(key), value) for key, value in reference.items() if key != "sample_size"):
            return name
    return "custom"


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
