"""SC-Tuner: a zero-initialised adapter on every skip connection (SCEdit, Eq. 5-6)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tuners.layout import SkipShape


def mid_width(channels: int, down_ratio: float) -> int:
    """Hidden width of an adapter on `channels`: int(C · down_ratio) as the reference code computes it."""
    return max(1, int(channels * down_ratio))


class SkipAdapter(nn.Module):
    """`W_up · GELU(W_down · x)` per pixel (a 1×1 conv written as channels-last Linear layers).

    `W_up` starts at zero, so the adapter adds nothing before training. Weights may live in a
    different dtype than the skip (fp32 tuner on an fp16 UNet); the input is cast to match.
    Parameter names `ln1` / `ln2` follow the reference implementation.
    """

    def __init__(self, channels: int, mid_channels: int) -> None:
        super().__init__()
        self.ln1 = nn.Linear(channels, mid_channels)
        self.activate = nn.GELU()
        self.ln2 = nn.Linear(mid_channels, channels)
        nn.init.zeros_(self.ln2.weight)
        nn.init.zeros_(self.ln2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.permute(0, 2, 3, 1).to(self.ln1.weight.dtype)
        out = self.ln2(self.activate(self.ln1(channels_last)))
        return out.permute(0, 3, 1, 2).to(x.dtype)


@dataclass(frozen=True)
class SCTunerConfig:
    """Everything an SC-Tuner's weights depend on: the skips and the adapters' width ratio."""

    shape: SkipShape
    down_ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.down_ratio, bool) or not isinstance(self.down_ratio, (int, float)) or not 0 < self.down_ratio <= 4:
            raise ValueError(f"down_ratio must be a number in (0, 4], got {self.down_ratio!r}")
        object.__setattr__(self, "shape", self.shape.shape)  # a SkipLayout's routing is not part of a tuner


class SCTuner(nn.Module):
    """One `SkipAdapter` per skip g; the edited skip is `x_g + scale · adapter_g(x_g)` (Eq. 6)."""

    def __init__(self, shape: SkipShape, down_ratio: float = 1.0) -> None:
        super().__init__()
        self.config = SCTunerConfig(shape, down_ratio)
        self.adapters = nn.ModuleList(SkipAdapter(c, mid_width(c, down_ratio)) for c in self.config.shape.channels)

    @classmethod
    def from_config(cls, config: SCTunerConfig) -> SCTuner:
        return cls(config.shape, config.down_ratio)

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
