"""CSC-Tuner: condition features injected into every skip connection (SCEdit, Eq. 7, Fig. 4b/c)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tuners.layout import SkipShape
from tuners.sc_tuner import SkipAdapter, mid_width


def hint_widths(out_channels: int = 256, dim_ratio: float = 1.0) -> tuple[int, ...]:
    """Output widths of the hint encoder's seven convs, as the reference builds them from
    PRE_HINT_OUT_CHANNELS and PRE_HINT_DIM_RATIO (SD 1.5 / 2.1 controllers: 256, 1.0; SDXL: 320, 2.0)."""
    return tuple(int(w * dim_ratio) for w in (16, 16, 32, 32, 96, 96)) + (out_channels,)


# Which of the hint encoder's convs halve the resolution: pixels -> latent resolution (÷8).
_HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
HINT_DOWNSAMPLE = math.prod(_HINT_STRIDES)


def hint_encoder(in_channels: int = 3, out_channels: int = 256, dim_ratio: float = 1.0) -> nn.Sequential:
    """3×3 convs with SiLU between them; Sequential indices match the reference `pre_hint_blocks.{i}`."""
    layers: list[nn.Module] = []
    for width, stride in zip(hint_widths(out_channels, dim_ratio), _HINT_STRIDES):
        conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1)
        # He init: with PyTorch's default init each conv shrinks its input, and after seven of them a
        # sparse condition (a canny map is ~2 % white) barely changes the output, so the zero convs
        # above it get almost no image-dependent gradient and training stalls.
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.SiLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


def zero_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _TunerBlock(nn.Module):
    """Holds the per-skip op under the reference key name `lsc_tuner_blocks.{g}.tuner_op`."""

    def __init__(self, channels: int, mid_channels: int) -> None:
        super().__init__()
        self.tuner_op = SkipAdapter(channels, mid_channels)


ConditionFeatures = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CSCTunerConfig:
    """Everything a CSC-Tuner's weights and output depend on.

    The hint fields and `scale` mirror the reference configuration (PRE_HINT_IN_CHANNELS,
    PRE_HINT_OUT_CHANNELS, PRE_HINT_DIM_RATIO, DENSE_HINT_KERNAL, DOWN_RATIO, SCALE).
    """

    shape: SkipShape
    kernel_size: int = 1
    condition_type: str = "canny"
    hint_in_channels: int = 3
    hint_channels: int = 256
    hint_dim_ratio: float = 1.0
    down_ratio: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {self.kernel_size!r}")
        for name in ("hint_in_channels", "hint_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"{name} must be a whole number in [1, 4096], got {value!r}")
        for name, low, high in (("hint_dim_ratio", 0.0, 16.0), ("down_ratio", 0.0, 4.0), ("scale", 0.0, 16.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
        if not isinstance(self.condition_type, str):
            raise ValueError(f"condition_type must be text, got {self.condition_type!r}")
        object.__setattr__(self, "shape", self.shape.shape)  # a SkipLayout's routing is not part of a tuner


class CSCTuner(nn.Module):
    """Hint encoder + cascade of zero convs (one per skip) + a per-skip tuner op T_g."""

    def __init__(
        self,
        shape: SkipShape,
        kernel_size: int = 1,
        condition_type: str = "canny",
        *,
        hint_in_channels: int = 3,
        hint_channels: int = 256,
        hint_dim_ratio: float = 1.0,
        down_ratio: float = 1.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = CSCTunerConfig(
            shape, kernel_size, condition_type, hint_in_channels, hint_channels, hint_dim_ratio, down_ratio, scale
        )
        channels = self.config.shape.channels
        self.pre_hint_blocks = hint_encoder(hint_in_channels, hint_channels, hint_dim_ratio)
        in_channels = (hint_channels,) + channels[:-1]
        self.dense_hint_blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), zero_conv(c_in, c_out, kernel_size, 2 if down else 1))
            for c_in, c_out, down in zip(in_channels, channels, self.config.shape.is_downsample)
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
        self.lsc_tuner_blocks = nn.ModuleList(_TunerBlock(c, mid_width(c, down_ratio)) for c in channels)

    @classmethod
    def from_config(cls, config: CSCTunerConfig) -> CSCTuner:
        return cls(
            config.shape, config.kernel_size, config.condition_type, hint_in_channels=config.hint_in_channels,
            hint_channels=config.hint_channels, hint_dim_ratio=config.hint_dim_ratio, down_ratio=config.down_ratio,
            scale=config.scale,
        )

    @property
    def shape(self) -> SkipShape:
        return self.config.shape

    @property
    def kernel_size(self) -> int:
        return self.config.kernel_size

    @property
    def condition_type(self) -> str:
        return self.config.condition_type

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
        channels = self.config.hint_in_channels
        if image.ndim != 4 or image.shape[1] != channels:
            raise ValueError(f"condition image must be (batch, {channels}, height, width), got {tuple(image.shape)}")
        c = self.pre_hint_blocks(image.to(self.dense_hint_blocks[0][1].weight.dtype))
        features = []
        for block in self.dense_hint_blocks:  # c_g = ZeroConv_k(SiLU(c_{g-1}))
            c = block(c)
            features.append(c)
        return tuple(features)

    def forward(self, g: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """out_g = scale · (c_g + T_g(x_g + c_g)); the caller adds α · out_g to the skip (Eq. 7).

        `lsc_tuner_blocks` here are in encoder order g; official files hold them in decoder order.
        """
        c = c.to(x.dtype)
        out = c + self.lsc_tuner_blocks[g].tuner_op(x + c)
        return out if self.config.scale == 1.0 else self.config.scale * out


def interpolate_features(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weight: float) -> ConditionFeatures:
    """Blend the dense features of two condition images (paper Fig. 9b): weight 0 → a, 1 → b."""
    return tuple(torch.lerp(fa, fb.to(fa.dtype), weight) for fa, fb in zip(a, b))
