"""SC-Tuner: a zero-initialised adapter on every skip connection (SCEdit, Eq. 5-6)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tuners.layout import SkipShape


def mid_width(channels: int, down_ratio: float) -> int:
    """Hidden width of an adapter on `channels`: int(C · down_ratio) as the reference code computes it."""
    return max(1, int(channels * down_ratio))


KERNEL_SIZES = (1, 3)


class SkipAdapter(nn.Module):
    """`W_up · GELU(W_down * x)`: with kernel 1, per pixel (channels-last Linear layers, as the reference
    implementation, so official files load); with kernel 3, `W_down` is a 3×3 convolution that sees each pixel's
    neighbours. A pointwise adapter can only amplify whatever pattern the noise starts with, so a periodic texture
    (stripes, dots, hatching) shows weakly; the 3×3 one learns it (docs/training.md).

    `W_up` starts at zero, so the adapter adds nothing before training. Weights may live in a
    different dtype than the skip (fp32 tuner on an fp16 UNet); the input is cast to match.
    Parameter names `ln1` / `ln2` follow the reference implementation.
    """

    def __init__(self, channels: int, mid_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.ln1 = nn.Linear(channels, mid_channels) if kernel_size == 1 else nn.Conv2d(channels, mid_channels, kernel_size, padding=kernel_size // 2)
        self.activate = nn.GELU()
        self.ln2 = nn.Linear(mid_channels, channels)
        nn.init.zeros_(self.ln2.weight)
        nn.init.zeros_(self.ln2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = x.to(self.ln1.weight.dtype)
        if isinstance(self.ln1, nn.Conv2d):
            hidden = self.ln1(x_in).permute(0, 2, 3, 1)
        else:
            hidden = self.ln1(x_in.permute(0, 2, 3, 1))
        return self.ln2(self.activate(hidden)).permute(0, 3, 1, 2).to(x.dtype)


@dataclass(frozen=True)
class SCTunerConfig:
    """Everything an SC-Tuner's weights depend on: the skips, the adapters' width ratio and their kernel."""

    shape: SkipShape
    down_ratio: float = 1.0
    kernel_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.down_ratio, bool) or not isinstance(self.down_ratio, (int, float)) or not 0 < self.down_ratio <= 4:
            raise ValueError(f"down_ratio must be a number in (0, 4], got {self.down_ratio!r}")
        if self.kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be 1 or 3, got {self.kernel_size!r}")
        object.__setattr__(self, "shape", self.shape.shape)  # a SkipLayout's routing is not part of a tuner


class SCTuner(nn.Module):
    """One `SkipAdapter` per skip g; the edited skip is `x_g + scale · adapter_g(x_g)` (Eq. 6)."""

    def __init__(self, shape: SkipShape, down_ratio: float = 1.0, kernel_size: int = 1) -> None:
        super().__init__()
        self.config = SCTunerConfig(shape, down_ratio, kernel_size)
        self.adapters = nn.ModuleList(SkipAdapter(c, mid_width(c, down_ratio), kernel_size) for c in self.config.shape.channels)

    @classmethod
    def from_config(cls, config: SCTunerConfig) -> SCTuner:
        return cls(config.shape, config.down_ratio, config.kernel_size)

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
