"""Does the text encoder say where each clause's shape goes? A probe of its output, as cross-attention reads it.

    python bench/text_layout_probe.py [--model PATH] [--train 20000] [--steps 3000] [--n 400] [--json [PATH]]

A fresh `LayoutReader` (nine learned cell queries attending to the encoder's 77 outputs, the training aid of
`layout_loss_weight`) learns from the frozen encoder's outputs for `--train` canonical captions of training scenes
what each cell holds, then reads `--n` held-out captions (combinations never seen). Reported per clause of the
prompts of several shapes: how often it finds the 1st / 2nd / 3rd named shape's colour and kind in that shape's
cell, and how often it finds nothing where nothing is. A UNet cannot place what its text does not say.
"""
from __future__ import annotations

import argparse
import time

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from scedit_ui.model_manager import BUILTIN_MODEL  # noqa: E402
from scedit_ui.shapes import world  # noqa: E402
from scedit_ui.shapes.tiny_model import LayoutReader, layout_targets, tokenize  # noqa: E402

BATCH = 128


@torch.no_grad()
def encode(encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenize(tokenizer, captions)
    return torch.cat([encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])


def run(model: str, train: int, steps: int, n: int) -> dict:
    started = time.perf_counter()
    folder = model or str(BUILTIN_MODEL)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32).eval()
    train_scenes = [world.sample_scene(i, split="train") for i in range(train)]
    test_scenes = [world.sample_scene(i, split="heldout") for i in range(n)]
    train_captions = [world.caption(scene) for scene in train_scenes]
    test_captions = [world.caption(scene) for scene in test_scenes]
    train_text, test_text = encode(encoder, tokenizer, train_captions), encode(encoder, tokenizer, test_captions)
    train_colours, train_kinds = layout_targets(train_captions)
    torch.manual_seed(0)
    reader = LayoutReader(encoder.config.hidden_size)
    optimizer = torch.optim.Adam(reader.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, train, (BATCH,), generator=generator)
        loss = reader.loss(train_text[rows], train_colours[rows], train_kinds[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        colour_logits, kind_logits = reader(test_text)
    colours, kinds = colour_logits.argmax(-1), kind_logits.argmax(-1)
    target_colours, target_kinds = layout_targets(test_captions)
    clause_colour, clause_kind = [], []
    for clause in range(max(len(scene.shapes) for scene in test_scenes)):
        cells = [(row, world.POSITIONS.index(scene.shapes[clause].position))
                 for row, scene in enumerate(test_scenes) if len(scene.shapes) > max(clause, 1)]
        clause_colour.append(sum(int(colours[r, c] == target_colours[r, c]) for r, c in cells) / len(cells))
        clause_kind.append(sum(int(kinds[r, c] == target_kinds[r, c]) for r, c in cells) / len(cells))
    empty = target_colours == len(world.COLORS)
    return {
        "model": folder, "train_captions": train, "steps": steps, "heldout_captions": n,
        "clause_colour_accuracy": clause_colour, "clause_kind_accuracy": clause_kind,
        "empty_cells_read_empty": float((colours[empty] == len(world.COLORS)).float().mean()),
        "final_train_loss": loss.item(), "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model folder (default: the built-in tiny model)")
    parser.add_argument("--train", type=int, default=20_000, help="training captions the probe learns from")
    parser.add_argument("--steps", type=int, default=3_000, help="probe training steps (batch 128)")
    parser.add_argument("--n", type=int, default=400, help="held-out captions scored")
    _common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.train, args.steps, args.n) < 1:
        parser.error("--train, --steps and --n must be positive")
    result = run(args.model, args.train, args.steps, args.n)
    _common.report(result, args.json, print_summary)


def print_summary(result: dict) -> None:
    def fractions(values: list[float]) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    print(f"{result['model']}: the shape of the 1st / 2nd / 3rd clause read in its cell (prompts of several shapes, "
          f"{result['heldout_captions']} held-out captions): colour {fractions(result['clause_colour_accuracy'])}, "
          f"kind {fractions(result['clause_kind_accuracy'])}; empty cells read empty "
          f"{result['empty_cells_read_empty']:.3f} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
