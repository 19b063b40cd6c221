"""Where the skip connections of a diffusers `UNet2DConditionModel` are, derived from its config.

`SkipShape` is what tuners and files need (channels, downsample flags); `SkipLayout` adds the routing
to the up blocks, which only the editor (hooks) and the import of diffusers-keyed checkpoints need.

`down_block_res_samples` holds, in encoder order g = 0..K-1, the `conv_in` output, then each down
block's resnet outputs and its downsampler output. Up block b receives the last `len(resnets)`
entries of what remains as `res_hidden_states_tuple` and pops from the end (DESIGN.md §3).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn


class LayoutMismatchError(ValueError):
    """A tuner was built for a different skip layout than the UNet it is attached to."""


@dataclass(frozen=True)
class SkipShape:
    """Channels of every skip connection (encoder order g) and which ones are downsampler outputs.

    This is all a tuner's weights depend on; files and official checkpoints carry exactly this.
    """

    channels: tuple[int, ...]
    is_downsample: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.is_downsample):
            raise ValueError(f"{len(self.channels)} skip channels but {len(self.is_downsample)} downsample flags")

    @property
    def num_skips(self) -> int:
        return len(self.channels)

    @property
    def shape(self) -> SkipShape:
        """The shape alone (a `SkipLayout` drops its routing)."""
        return SkipShape(tuple(self.channels), tuple(self.is_downsample))

    def downsamples_before(self, g: int) -> int:
        """Number of downsamplers up to and including skip g: skip g has latent size / 2**this."""
        return sum(self.is_downsample[: g + 1])

    def describe(self) -> str:
        marks = ",".join(f"{c}{'↓' if d else ''}" for c, d in zip(self.channels, self.is_downsample))
        return f"{self.num_skips} skips [{marks}]"

    def check_matches(self, other: SkipShape, what: str) -> None:
        """Raise `LayoutMismatchError` naming both shapes unless `other` has the same skips."""
        if (tuple(self.channels), tuple(self.is_downsample)) != (tuple(other.channels), tuple(other.is_downsample)):
            raise LayoutMismatchError(
                f"{what} was built for a UNet with {other.describe()}, but this UNet has {self.describe()} "
                "(↓ marks downsample outputs). Use a tuner trained for this base model."
            )


@dataclass(frozen=True)
class SkipLayout(SkipShape):
    """A `SkipShape` plus the UNet's routing: which up block (decoder order) receives which skips."""

    up_block_skips: tuple[tuple[int, ...], ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SkipLayout:
        block_channels = tuple(config["block_out_channels"])
        num_blocks = len(block_channels)
        layers = config.get("layers_per_block", 2)
        layers_per_block = (layers,) * num_blocks if isinstance(layers, int) else tuple(layers)

        channels = [block_channels[0]]  # conv_in
        is_downsample = [False]
        for i, out_channels in enumerate(block_channels):
            channels += [out_channels] * layers_per_block[i]
            is_downsample += [False] * layers_per_block[i]
            if i < num_blocks - 1:  # every down block but the last ends with a downsampler
                channels.append(out_channels)
                is_downsample.append(True)

        # Up block b (decoder order) has layers_per_block[reversed b] + 1 resnets and takes that many
        # skips from the end of what remains; its tuple is in encoder order.
        up_block_skips = []
        end = len(channels)
        for layers_in_block in reversed(layers_per_block):
            start = end - (layers_in_block + 1)
            up_block_skips.append(tuple(range(start, end)))
            end = start
        if end != 0:
            raise ValueError(f"UNet config does not consume all {len(channels)} skips: {dict(config)}")
        return cls(tuple(channels), tuple(is_downsample), tuple(up_block_skips))

    @classmethod
    def from_unet(cls, unet: nn.Module) -> SkipLayout:
        layout = cls.from_config(unet.config)
        received = tuple(len(block.resnets) for block in unet.up_blocks)
        if received != tuple(len(skips) for skips in layout.up_block_skips):
            raise ValueError(f"UNet up blocks take {received} skips, config implies {layout.up_block_skips}")
        return layout
