"""Few-shot style tuners as a new user makes them: a folder of images, the DEFAULT training settings, a scale sweep.

    python bench/style_fewshot.py [--sets stripes,polka-dots,hatched] [--n 16] [--scales 0,0.5,0.75,1,1.25]
                                  [--work runs/bench/style] [--tuners DIR] [--plot docs/style-tradeoff.png] [--json PATH]
                                  [--reuse] [--conditional-only | --texture | --defaults] [--model PATH]

Each set is trained with the default settings of `python -m scedit_ui train --kind sc` (nothing but the data,
the trigger word and the output is given):

- stripes, polka-dots: `--data "shapes:STYLE" --remove-word "in STYLE style"`: 30 Shapes-world scenes in a style
  the base model never saw, captioned with the scene (colours, shapes, positions) but not the style. These are
  the commands of the shipped style tuners: `--tuners assets/tuners` writes style-stripes/style-polka-dots there.
- hatched: `--data DIR`, a folder of 20 pictures drawn here with PIL, not by the Shapes renderer (ellipses,
  rectangles and irregular polygons under anti-diagonal pen hatching), with no captions at all.

Then, at each tuner scale, images for held-out Shapes prompts with the trigger word (prompt i, seed i):
- style: the checker's style score (hatching is scored as stripes), relative to the training pictures' own score
  (target ≥ 0.8);
- colour: the checker's colour accuracy of those images against their prompts (target ≥ 0.80).
Scale 0 is the base model alone. Training seconds are wall time here (one torch thread). `--reuse` sweeps tuner
files already there instead of training them; `--conditional-only` applies the tuner to the conditional half of
classifier-free guidance only (`TunerUse.conditional_only`); `--texture` as texture guidance (`TunerUse.texture`: the
tuner's fine texture at the scale, the base's colours); `--defaults` uses, instead of `--scales`, the scale and way
each file asks for (`default_scale`, `default_conditional_only`, `default_texture`): what a user who changes nothing gets.
The reference ("best reachable") is the style itself put on the renders of the same held-out scenes and passed
through the base model's VAE, as every generated image is: its colour accuracy is the most a tuner that fully
shows the style can keep. `--replot A.json B.json ... --plot FILE` redraws the plot from earlier runs.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, set_threads

set_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from scedit_ui.cli import main as cli  # noqa: E402
from scedit_ui.model_manager import ModelManager  # noqa: E402
from scedit_ui.request import GenerationRequest, TunerUse  # noqa: E402
from scedit_ui.shapes.checker import score_adherence, style_score  # noqa: E402
from scedit_ui.shapes.world import COLORS, apply_style, caption, render_scene, sample_scene  # noqa: E402
from scedit_ui.training import TrainingConfig, load_training_data  # noqa: E402

TRIGGER = "<sce>"
SETS = {"stripes": "stripes", "polka-dots": "polka dots", "hatched": "stripes"}  # set -> the checker's style
HATCH_SPACING = 14  # px along x, so not the Shapes world's stripe period (16 in x + y)


def hatched_picture(seed: int, size: int = 128) -> tuple[Image.Image, str]:
    """A PIL drawing: one filled ellipse, rectangle or irregular polygon on a plain background, under diagonal
    hatching (dark strokes on light colours, light strokes on dark ones), and what it shows."""
    rng = random.Random(seed)
    background, colour = rng.sample(list(COLORS), 2)
    picture = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(picture)
    kind = rng.choice(["ellipse", "rectangle", "polygon"])
    cx, cy = (rng.uniform(0.27, 0.73) * size for _ in range(2))
    r = rng.uniform(0.14, 0.27) * size
    if kind == "ellipse":
        draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=COLORS[colour])
    elif kind == "rectangle":
        draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=COLORS[colour])
    else:
        angles = np.linspace(0, 2 * np.pi, 7)[:-1]
        draw.polygon([(cx + r * rng.uniform(0.6, 1) * np.cos(a), cy + r * rng.uniform(0.6, 1) * np.sin(a)) for a in angles],
                     fill=COLORS[colour])
    article = "an" if colour[0] in "aeiou" else "a"
    return hatch(picture), f"{article} {colour} {kind} on a {background} background"


def hatch(picture: Image.Image) -> Image.Image:
    """Anti-diagonal pen strokes over `picture`: dark on light colours, light on dark ones."""
    width, height = picture.size
    strokes = Image.new("L", picture.size, 0)
    pen = ImageDraw.Draw(strokes)
    for k in range(-height, width + height, HATCH_SPACING):  # lines x - y = k
        pen.line([(k, 0), (k + height, height)], fill=255, width=3)
    pixels = np.asarray(picture.convert("RGB"), np.float32)
    ink = (np.asarray(strokes, np.float32) / 255 * 0.5)[..., None]
    target = np.where(pixels.mean(2, keepdims=True) > 140, 0.0, 255.0)
    return Image.fromarray((pixels * (1 - ink) + target * ink).astype(np.uint8))


def hatched_folder(folder: Path, count: int) -> Path:
    """PIL drawings as a user's folder, without captions."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        hatched_picture(i)[0].save(folder / f"drawing-{i:02d}.png")
    return folder


def data_arguments(name: str, work: Path, images: int) -> list[str]:
    if name == "hatched":
        return ["--data", str(hatched_folder(work / "data", images))]
    return ["--data", f"shapes:{SETS[name]}", "--remove-word", f"in {SETS[name]} style"]


def train(arguments: list[str], out: Path, work: Path, model: str) -> float:
    """Wall seconds of the training command with `arguments` and otherwise default settings."""
    shutil.rmtree(work, ignore_errors=True)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    # --fp16 as the documented commands: with --tuners assets/tuners this writes the shipped files.
    model_arguments = ["--model", model] if model else []
    code = cli(["train", "--kind", "sc", *arguments, *model_arguments, "--trigger", TRIGGER, "--out", str(out),
                "--work-dir", str(work), "--fp16"])
    if code != 0:
        raise SystemExit(f"training {' '.join(arguments)} failed with exit code {code}")
    return time.perf_counter() - started


def training_pictures(arguments: list[str]) -> list[Image.Image]:
    config = TrainingConfig(kind="sc", data=arguments[1], out=Path("unused.safetensors"))
    data = load_training_data(config)
    return [data.image(i, 128) for i in range(data.size)]


def stylise(name: str, picture: Image.Image) -> Image.Image:
    if name == "hatched":
        return hatch(picture)
    return apply_style(picture, SETS[name])


@torch.no_grad()
def reference(manager: ModelManager, name: str, n: int) -> dict:
    """Style and colour accuracy of the held-out scenes' renders in the style, after a VAE round trip."""
    vae = manager.pipeline.vae
    styles, colours, shapes = [], [], []
    for i in range(n):
        scene = sample_scene(i, split="heldout")
        pixels = torch.from_numpy(np.asarray(stylise(name, render_scene(scene, 128)), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        decoded = vae.decode(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean).sample[0].float()
        image = Image.fromarray(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        adherence = score_adherence(image, scene)
        styles.append(style_score(image, SETS[name]))
        colours.append(adherence.color_correct)
        shapes.append(adherence.shape_correct)
    return {"style": float(np.mean(styles)), "colour_accuracy": float(np.mean(colours)), "shape_accuracy": float(np.mean(shapes))}


def sweep(manager: ModelManager, tuner: Path, style: str, scales: list[float], n: int, conditional_only: bool, texture: bool = False) -> list[dict]:
    rows = []
    for scale in scales:
        styles, colours, shapes = [], [], []
        for i in range(n):
            scene = sample_scene(i, split="heldout")
            uses = (TunerUse(str(tuner), scale, conditional_only, texture),) if scale else ()
            image = manager.generate(GenerationRequest(f"{TRIGGER} {caption(scene)}", seed=i, sc_tuners=uses)).images[0]
            adherence = score_adherence(image, scene)
            styles.append(style_score(image, style))
            colours.append(adherence.color_correct)
            shapes.append(adherence.shape_correct)
        rows.append({"scale": scale, "style": float(np.mean(styles)), "colour_accuracy": float(np.mean(colours)),
                     "shape_accuracy": float(np.mean(shapes))})
        print(f"  scale {scale:g}: style {rows[-1]['style']:.3f}, colour accuracy {rows[-1]['colour_accuracy']:.3f}, "
              f"shape accuracy {rows[-1]['shape_accuracy']:.3f}", flush=True)
    return rows


def plot(results: list[dict], path: Path) -> None:
    """Style and colour accuracy against the scale, one panel per way of applying the tuner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def how(result: dict) -> str:
        return "texture" if result.get("texture") else "style" if result.get("conditional_only") else "both"

    titles = {"both": "both halves of guidance (the paper)", "style": "the conditional half of guidance only (style guidance)",
              "texture": "texture guidance (its fine texture, the base's colours)"}
    modes = [mode for mode in titles if any(how(r) == mode for r in results)]
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes) + 2.5, 3.8), dpi=110, squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for result, colour in zip([r for r in results if how(r) == mode], ("tab:red", "tab:blue", "tab:green")):
            scales, name = [r["scale"] for r in result["sweep"]], result["set"]
            axis.plot(scales, [r["style_ratio"] for r in result["sweep"]], "-o", color=colour, label=f"{name}: style ÷ training pictures'")
            axis.plot(scales, [r["colour_accuracy"] for r in result["sweep"]], "--s", color=colour, label=f"{name}: colour accuracy")
            if "reference" in result:  # drawn at the right edge: the style itself, through the VAE
                edge = max(scales) + 0.25
                axis.plot([edge], [result["reference"]["style_ratio"]], "o", color=colour, markerfacecolor="none")
                axis.plot([edge], [result["reference"]["colour_accuracy"]], "s", color=colour, markerfacecolor="none")
        axis.axhline(0.8, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("tuner scale (0: the base alone); open marks: the style itself through the VAE", fontsize=8)
        axis.set_ylabel("measured")
        axis.set_ylim(0, max(1.1, max(r["style_ratio"] for result in results for r in result["sweep"]) + 0.05))
        axis.set_title(f"Tuner as {titles[mode]}; targets 0.8, dotted", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--model", default="", help="base model (default: the built-in tiny model)")
    parser.add_argument("--images", type=int, default=20, help="hatched: pictures in the folder")
    parser.add_argument("--n", type=int, default=16, help="held-out prompts per scale")
    parser.add_argument("--scales", default="0,0.5,0.75,1,1.25")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "style")
    parser.add_argument("--tuners", type=Path, help="write the stripes and polka-dots tuners here (default: under --work)")
    parser.add_argument("--plot", type=Path, help="write the trade-off plot (PNG) here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--reuse", action="store_true", help="sweep the tuner files already there; train only missing ones")
    halves = parser.add_mutually_exclusive_group()
    halves.add_argument("--conditional-only", action="store_true", help="apply the tuner to the conditional CFG half only")
    halves.add_argument("--texture", action="store_true", help="apply the tuner as texture guidance")
    halves.add_argument("--defaults", action="store_true", help="each file's own default scale and way of applying it, not --scales")
    parser.add_argument("--replot", nargs="+", type=Path, metavar="JSON", help="only redraw --plot from these results")
    args = parser.parse_args()
    if args.replot:
        plot([result for path in args.replot for result in json.loads(path.read_text())], args.plot)
        return 0
    scales = [float(s) for s in args.scales.split(",")]
    manager = ModelManager("auto")
    manager.load(args.model)
    results = []
    for name in args.sets.split(","):
        arguments = data_arguments(name, args.work / name, args.images)
        tuner = (args.tuners if args.tuners and name != "hatched" else args.work / name) / f"style-{name}.safetensors"
        seconds = None if args.reuse and tuner.exists() else train(arguments, tuner, args.work / name / "run", args.model)
        train_score = float(np.mean([style_score(p, SETS[name]) for p in training_pictures(arguments)]))
        trained = f"trained in {seconds:.0f} s" if seconds is not None else f"reusing {tuner}"
        print(f"{name}: {trained}; training pictures' style score {train_score:.3f}", flush=True)
        conditional_only, texture = args.conditional_only, args.texture
        if args.defaults:
            default = TunerUse.of_file(tuner)
            scales, conditional_only, texture = [default.scale], default.conditional_only, default.texture
            print(f"  the file's defaults: scale {scales[0]:g}, {default.how}", flush=True)
        rows = sweep(manager, tuner, SETS[name], scales, args.n, conditional_only, texture)
        best = reference(manager, name, args.n)
        for row in (*rows, best):
            row["style_ratio"] = row["style"] / train_score
        print(f"  the style through the VAE: style {best['style']:.3f}, colour accuracy {best['colour_accuracy']:.3f}, "
              f"shape accuracy {best['shape_accuracy']:.3f}", flush=True)
        results.append({"set": name, "command": arguments, "training_seconds": seconds, "train_style": train_score,
                        "conditional_only": conditional_only, "texture": texture, "defaults": args.defaults, "sweep": rows, "reference": best})
    if args.plot:
        plot(results, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
