"""SC-Tuner: a zero-initialised adapter on every skip connection (SCEdit, Eq. 5-6)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from tuners.layout import SkipShape


def mid_width(channels: int, down_ratio: float) -> int:
    """Hidden width of an adapter on `channels`: int(C · down_ratio) as the reference code computes it."""
    return max(1, int(channels * down_ratio))


KERNEL_SIZES = (1, 3)
# Position features: sine and cosine of each skip pixel's place in the latent along these directions and periods
# (latent pixels). A periodic style sits at a fixed phase on the canvas of its pictures (the renderer's stripes and
# dots, a user's hatching drawn with one ruler); seeing where it is, the adapter can draw the pattern instead of
# growing it out of the noise (docs/training.md: more style at the same colour accuracy).
POSITION_DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))
POSITION_PERIODS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
POSITION_CHANNELS = 2 * len(POSITION_DIRECTIONS) * len(POSITION_PERIODS)


@lru_cache(maxsize=64)  # the same few maps at every step of every sampling: a quarter of a 3x3 adapter's time
def position_features(height: int, width: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, POSITION_CHANNELS, height, width): the sinusoids at the centres of a skip's pixels, `stride` latent
    pixels apart. Cached and shared: read it, never change it in place."""
    with torch.inference_mode(False):  # an inference tensor, cached, would be refused by autograd in a later training step
        rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        columns = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        v, u = torch.meshgrid(rows, columns, indexing="ij")
        phases = [2 * math.pi * (a * u + b * v) / period for a, b in POSITION_DIRECTIONS for period in POSITION_PERIODS]
        return torch.stack([f(phase) for phase in phases for f in (torch.sin, torch.cos)])[None].to(dtype)


class SkipAdapter(nn.Module):
    """`W_up · GELU(W_down * x)`, or gated `W_up · (GELU(W_down * x) ⊙ (W_gate * x))`: with kernel 1, per pixel
    (channels-last Linear layers, as the reference implementation, so official files load); with kernel 3, `W_down`
    is a 3×3 convolution that sees each pixel's neighbours. A pointwise adapter can only amplify whatever pattern the noise starts with, so a periodic texture
    (stripes, dots, hatching) shows weakly; the 3×3 one learns it (docs/training.md).

    With `position_stride` (the skip's pixel size in latent pixels) `W_down` also reads `position_features`.
    The gate (`W_gate`, the same shape as `W_down`) makes a product one term: a periodic style is the pattern (where,
    from the position features) times its polarity (light strokes on dark colours, dark on light, from the skip),
    which a sum of GELUs only approximates (docs/training.md: polka dots 0.52x -> 0.63x of their style at the defaults).

    `W_up` starts at zero, so the adapter adds nothing before training. Weights may live in a
    different dtype than the skip (fp32 tuner on an fp16 UNet); the input is cast to match.
    Parameter names `ln1` / `ln2` follow the reference implementation.
    """

    def __init__(
        self, channels: int, mid_channels: int, kernel_size: int = 1, position_stride: int | None = None, gated: bool = False
    ) -> None:
        super().__init__()
        self.position_stride = position_stride
        inputs = channels + (POSITION_CHANNELS if position_stride is not None else 0)

        def first_layer() -> nn.Module:
            if kernel_size == 1:
                return nn.Linear(inputs, mid_channels)
            return nn.Conv2d(inputs, mid_channels, kernel_size, padding=kernel_size // 2)

        self.ln1 = first_layer()
        self.gate = first_layer() if gated else None
        self.activate = nn.GELU()
        self.ln2 = nn.Linear(mid_channels, channels)
        nn.init.zeros_(self.ln2.weight)
        nn.init.zeros_(self.ln2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = x.to(self.ln1.weight.dtype)
        if self.position_stride is not None:
            where = position_features(x.shape[2], x.shape[3], self.position_stride, x.device, x_in.dtype)
            x_in = torch.cat([x_in, where.expand(x.shape[0], -1, -1, -1)], dim=1)
        hidden = self.activate(_channels_last(self.ln1, x_in))
        if self.gate is not None:
            hidden = hidden * _channels_last(self.gate, x_in)
        return self.ln2(hidden).permute(0, 3, 1, 2).to(x.dtype)


def _channels_last(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer` (a 3×3 convolution, or a Linear on each pixel's channels) on x (N, C, H, W), as (N, H, W, C')."""
    if isinstance(layer, nn.Conv2d):
        return layer(x).permute(0, 2, 3, 1)
    return layer(x.permute(0, 2, 3, 1))


@dataclass(frozen=True)
class SCTunerConfig:
    """Everything an SC-Tuner's weights depend on: the skips, the adapters' width ratio, their kernel, whether
    they see position features and whether they are gated."""

    shape: SkipShape
    down_ratio: float = 1.0
    kernel_size: int = 1
    position_features: bool = False
    gated: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.down_ratio, bool) or not isinstance(self.down_ratio, (int, float)) or not 0 < self.down_ratio <= 4:
            raise ValueError(f"down_ratio must be a number in (0, 4], got {self.down_ratio!r}")
        if self.kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be 1 or 3, got {self.kernel_size!r}")
        for name in ("position_features", "gated"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "shape", self.shape.shape)  # a SkipLayout's routing is not part of a tuner


class SCTuner(nn.Module):
    """One `SkipAdapter` per skip g; the edited skip is `x_g + scale · adapter_g(x_g)` (Eq. 6)."""

    def __init__(
        self, shape: SkipShape, down_ratio: float = 1.0, kernel_size: int = 1, position_features: bool = False, gated: bool = False
    ) -> None:
        super().__init__()
        self.config = SCTunerConfig(shape, down_ratio, kernel_size, position_features, gated)
        shape = self.config.shape
        self.adapters = nn.ModuleList(
            SkipAdapter(c, mid_width(c, down_ratio), kernel_size, 2 ** shape.downsamples_before(g) if position_features else None, gated)
            for g, c in enumerate(shape.channels)
        )

    @classmethod
    def from_config(cls, config: SCTunerConfig) -> SCTuner:
        return cls(config.shape, config.down_ratio, config.kernel_size, config.position_features, config.gated)

    @property
    def shape(self) -> SkipShape:
        return self.config.shape

    @property
    def down_ratio(self) -> float:
        return self.config.down_ratio

    def delta(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """What the tuner adds to skip g."""
        return self.adapters[g](x)

    def forward(self, g: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(g, x)
