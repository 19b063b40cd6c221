"""SC-Tuner: a zero-initialised adapter on every skip connection (SCEdit, Eq. 5-6)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tuners.layout import SkipLayout


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


class SCTuner(nn.Module):
    """One `SkipAdapter` per skip g; the edited skip is `x_g + scale · adapter_g(x_g)` (Eq. 6)."""

    def __init__(self, layout: SkipLayout, down_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0 < down_ratio <= 4:
            raise ValueError(f"down_ratio must be in (0, 4], got {down_ratio}")
        self.layout = layout
        self.down_ratio = down_ratio
        self.adapters = nn.ModuleList(SkipAdapter(c, max(1, int(c * down_ratio))) for c in layout.channels)

    def delta(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """What the tuner adds to skip g."""
        return self.adapters[g](x)

    def forward(self, g: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(g, x)
