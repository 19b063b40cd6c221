"""One training step of the tiny model's UNet (forward, backward, AdamW) at batch 32, per latent and layout.

    python bench/unet_step.py [--threads 2] [--repeats 3] [--compile] [--json [PATH]]

Random latents, timesteps and text states, so only the architecture is measured: the ×8 latent (8×16×16),
the ×4 latent (4×32×32) with SD 1.5's layout (attention at every level but the last) and the ×4 latent with
the recipe's layout (`tiny_model.unet_config`: no attention at 32×32). The median of `--repeats` steps after
two warm-up steps. `--compile` runs each UNet through `torch.compile` (the first step's time, its compiling, is
reported too).
"""
from __future__ import annotations

import argparse
import sys

import _common

_common.set_threads()

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from scedit_ui.shapes.tiny_model import TEXT_HIDDEN, unet_config  # noqa: E402

BATCH = 32
SD15_LAYOUT = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
VARIANTS = {
    "x8, 8x16x16": (unet_config(8, 8), 8),
    "x4, 4x32x32, attention at 32x32 (SD 1.5 layout)": ({**unet_config(4, 4), **SD15_LAYOUT}, 4),
    "x4, 4x32x32, recipe layout": (unet_config(4, 4), 4),
}


def step_seconds(config: dict, channels: int, repeats: int, compile_unet: bool) -> tuple[float, float]:
    """The first step's seconds and the median of the ``repeats`` after the second."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    model = torch.compile(unet) if compile_unet else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    size = config["sample_size"]
    latents, text = torch.randn(BATCH, channels, size, size), torch.randn(BATCH, 77, TEXT_HIDDEN)
    timesteps = torch.randint(0, 1000, (BATCH,))

    def step() -> None:
        loss = (model(latents, timesteps, text).sample - latents).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # two warm-ups, to be safe: the first compiles (--compile) and allocates AdamW's state
    times = [_common.timed(step) for _ in range(repeats + 2)]
    return times[0], _common.median(times[2:])


def print_table(result: dict) -> None:
    for name, value in result["step_seconds"].items():
        first = f", first step {result['first_step_seconds'][name]:.0f} s" if result["compiled"] else ""
        print(f"{name:50s} {value:.2f} s per step (batch {result['batch']}{first})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each UNet (inductor)")
    args = parser.parse_args()
    measured = {
        name: step_seconds(config, channels, args.repeats, args.compile) for name, (config, channels) in VARIANTS.items()
    }
    result = {
        "batch": BATCH,
        "compiled": args.compile,
        "step_seconds": {name: round(median, 3) for name, (_, median) in measured.items()},
        "first_step_seconds": {name: round(first, 1) for name, (first, _) in measured.items()},
        "machine": _common.machine(),
    }
    _common.report(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
