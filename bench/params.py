"""Trainable parameters of every method against the SCEdit paper, counted on the meta device (no weights).

    python bench/params.py [--json [PATH]]

SC and CSC counts come from `tuners.__main__.parameter_report` (the same as `python -m tuners info`);
LoRA from peft on the UNet's attention projections; ControlNet from diffusers'
`ControlNetModel.from_unet` (hint block included). SD 1.5 and SD 2.1 have the same skip layout, so the
tuner counts are the same on both; the UNet and ControlNet differ (cross-attention width 768 vs 1024).
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402

from tuners.__main__ import parameter_report  # noqa: E402
from tuners.reference_configs import build_meta_unet  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# SCEdit paper (CVPR 2024), in millions: Table 1 (SC-Tuner) and the controllable-generation comparison.
PAPER = {"sc": 19.68, "sc10": 1.98, "csc_k1": 28.82, "csc_k3": 99.11, "controlnet": 364.23}


def count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_parameters(architecture: str, rank: int) -> int:
    unet = build_meta_unet(architecture).requires_grad_(False)
    with torch.device("meta"):
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    return count(unet, trainable_only=True)


def controlnet_parameters(architecture: str) -> dict[str, int]:
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(build_meta_unet(architecture), load_weights_from_unet=False)
    return {"total": count(controlnet), "hint block": count(controlnet.controlnet_cond_embedding)}


def measure() -> dict:
    rows: dict[str, dict] = {}
    for architecture in ("sd15", "sd21"):
        rows.setdefault("unet", {"method": "UNet (full fine-tuning)"})[architecture] = count(build_meta_unet(architecture))
        rows.setdefault("sc", {"method": "SC-Tuner, ratio 1 (SCEdit)"})[architecture] = parameter_report(architecture, "sc", 1.0)["total"]
        rows.setdefault("sc10", {"method": "SC-Tuner, ratio 0.1 (SCEdit10)"})[architecture] = parameter_report(architecture, "sc", 0.1)["total"]
        rows.setdefault("csc_k1", {"method": "CSC-Tuner, k=1"})[architecture] = parameter_report(architecture, "csc", kernel_size=1)["total"]
        rows.setdefault("csc_k3", {"method": "CSC-Tuner, k=3"})[architecture] = parameter_report(architecture, "csc", kernel_size=3)["total"]
        for rank in (64, 6):
            rows.setdefault(f"lora{rank}", {"method": f"LoRA r={rank} (to_q/k/v/out)"})[architecture] = lora_parameters(architecture, rank)
        controlnet = controlnet_parameters(architecture)
        rows.setdefault("controlnet", {"method": "ControlNet (diffusers from_unet)"})[architecture] = controlnet["total"]
        rows.setdefault("controlnet_hint", {"method": "  of which hint block"})[architecture] = controlnet["hint block"]
    for key, millions in PAPER.items():
        rows[key]["paper_millions"] = millions
    return {"benchmark": "params", "machine": _common.machine(), "parameters": rows}


def print_table(result: dict) -> None:
    rows = []
    for row in result["parameters"].values():
        paper = row.get("paper_millions")
        rows.append([row["method"], f"{row['sd15']:,}", f"{row['sd21']:,}", f"{paper:.2f}M" if paper else ""])
    print("Trainable parameters (meta device, no weights)")
    print(_common.table(rows, ["method", "SD 1.5", "SD 2.1", "paper"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    args = parser.parse_args()
    result = measure()
    _common.report(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
