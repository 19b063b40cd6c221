"""CSC-Tuner: condition features injected into every skip connection (SCEdit, Eq. 7, Fig. 4b/c)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tuners.layout import SkipLayout
from tuners.sc_tuner import SkipAdapter

HINT_CHANNELS = 256
# (in, out, stride) of the hint encoder's 3×3 convs: condition pixels -> latent resolution (÷8).
_HINT_CONVS = ((3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, HINT_CHANNELS, 2))


def hint_encoder() -> nn.Sequential:
    """Convs with SiLU between them; Sequential indices match the reference `pre_hint_blocks.{i}`."""
    layers: list[nn.Module] = []
    for in_channels, out_channels, stride in _HINT_CONVS:
        conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        # He init: with PyTorch's default init each conv shrinks its input, and after seven of them a
        # sparse condition (a canny map is ~2 % white) barely changes the output, so the zero convs
        # above it get almost no image-dependent gradient and training stalls.
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def zero_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _TunerBlock(nn.Module):
    """Holds the per-skip op under the reference key name `lsc_tuner_blocks.{g}.tuner_op`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.tuner_op = SkipAdapter(channels, channels)


ConditionFeatures = tuple[torch.Tensor, ...]


class CSCTuner(nn.Module):
    """Hint encoder + cascade of zero convs (one per skip) + a per-skip tuner op T_g."""

    def __init__(self, layout: SkipLayout, kernel_size: int = 1, condition_type: str = "canny") -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        self.layout = layout
        self.kernel_size = kernel_size
        self.condition_type = condition_type
        self.pre_hint_blocks = hint_encoder()
        in_channels = (HINT_CHANNELS,) + layout.channels[:-1]
        self.dense_hint_blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), zero_conv(c_in, c_out, kernel_size, 2 if down else 1))
            for c_in, c_out, down in zip(in_channels, layout.channels, layout.is_downsample)
        )
        # Only c_0 must start at zero for the tuner to start as the identity (SiLU(0) = 0 keeps every
        # later c_g at zero). Later convs start as the identity on the shared channels: from all zeros,
        # c_g's gradient is a product over all earlier stages, and the deep skips would not see the
        # condition for thousands of steps.
        for block in self.dense_hint_blocks[1:]:
            conv = block[1]
            shared = min(conv.in_channels, conv.out_channels)
            with torch.no_grad():
                conv.weight[range(shared), range(shared), kernel_size // 2, kernel_size // 2] = 1.0
        self.lsc_tuner_blocks = nn.ModuleList(_TunerBlock(c) for c in layout.channels)

    @torch.no_grad()
    def calibrate_hint_encoder(self, images: torch.Tensor) -> None:
        """Rescale each hint conv so that its output has unit standard deviation on `images` (LSUV init).

        For training from scratch. Sparse conditions (a canny map is ~2 % white) leave the freshly
        initialised hint encoder's output around 0.01, and c_0 = ZeroConv(SiLU(hint)) then needs weights
        of ~100 to matter: AdamW moves each weight by ~lr per step, so training would stall.
        """
        x = images.to(self.dense_hint_blocks[0][1].weight.dtype)
        for layer in self.pre_hint_blocks:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                std = x.std().clamp_min(1e-6)
                layer.weight /= std
                layer.bias /= std
                x = x / std

    def condition_features(self, image: torch.Tensor) -> ConditionFeatures:
        """c_g for every skip from a condition image (B, 3, 8·h, 8·w) in [0, 1]; depends on nothing else."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"condition image must be (batch, 3, height, width), got {tuple(image.shape)}")
        c = self.pre_hint_blocks(image.to(self.dense_hint_blocks[0][1].weight.dtype))
        features = []
        for block in self.dense_hint_blocks:  # c_g = ZeroConv_k(SiLU(c_{g-1}))
            c = block(c)
            features.append(c)
        return tuple(features)

    def forward(self, g: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """out_g = c_g + T_g(x_g + c_g); the caller adds α · out_g to the skip (Eq. 7)."""
        c = c.to(x.dtype)
        return c + self.lsc_tuner_blocks[g].tuner_op(x + c)


def interpolate_features(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weight: float) -> ConditionFeatures:
    """Blend the dense features of two condition images (paper Fig. 9b): weight 0 → a, 1 → b."""
    return tuple(torch.lerp(fa, fb.to(fa.dtype), weight) for fa, fb in zip(a, b))
