"""Quality of the shipped tuners on the built-in tiny model: control fidelity, few-shot style, composition.

    python bench/tuner_quality.py [--tuners assets/tuners] [--n 50] [--steps 20] [--json] [--model PATH] [--captions no-layout]

Prompts are held-out Shapes-world scenes (combinations the base model never saw); prompt i uses seed i.
The control image of a prompt is made from the render of its own scene. `--captions full` (the default) words
each prompt as the scene's canonical caption, positions and sizes named; `--captions no-layout` names the same
shapes, colours and background without positions or sizes, as a user of a control image writes, so only the
condition says where things go (a base that follows the full captions leaves a condition little to add).

- canny: edge F1 with a 2-pixel tolerance between the condition (Canny 100/200 of the render) and the
  Canny 100/200 of the generated image; with the canny tuner at α = 1 and without control. The same on edge maps
  no Shapes scene makes: line drawings of many strokes (lines, polylines, arcs, circles; 1 px white on black, as a
  Canny map looks), and the Canny 100/200 edges of scikit-image's sample photos (astronaut, coffee, chelsea, rocket,
  camera, immunohistochemistry; centre crop at the model's size), three seeds each (needs `pip install scikit-image`).
- colour: mean RGB distance (0-255 units, Euclidean) between the mean colours of each 16×16 cell of the
  generated image and of the colour condition (cells of 16 px, i.e. ratio 16); with and without control.
- reference: the same metrics for the render passed through the base model's VAE (encode, decode): the best a
  generation can reach, since every generated image is decoded by that VAE.
- inpaint: a LaMa-style random mask per prompt (`random_inpaint_mask`, seed i) over the render; mean RGB distance
  (0-255 units, Euclidean) per pixel between the render and the generated image on the pixels the mask keeps;
  with the inpaint tuner at α = 1 and without control.
- composition: canny and colour tuners (trained separately) together, each at α = `--alpha` (default 1), combined
  by `--alpha-mode` (default: the app's, `staged`: α as set, the canny condition ends at 0.85 of the steps), the
  canny condition asked for steps 0 to `--canny-until` (default 1); both metrics, beside each tuner alone on both
  (the colour error of the canny tuner's images, the edge F1 of the colour tuner's).
- style (each style-*.safetensors): the checker's style score of images made with the tuner from the new,
  style-free prompts, relative to the score of the tuner's own training images (target ≥ 0.8), and the
  checker's colour accuracy of those images (target ≥ 0.85); training set size and time from the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scedit_ui import conditions  # noqa: E402
from scedit_ui.model_manager import ModelManager  # noqa: E402
from scedit_ui.request import ConditionUse, GenerationRequest, TunerUse  # noqa: E402
from scedit_ui.shapes.checker import score_adherence, style_score  # noqa: E402
from scedit_ui.shapes.world import Scene, caption, plain_prompt, render_scene, sample_scene  # noqa: E402
from scedit_ui.training import TrainingConfig, load_training_data  # noqa: E402
from tuners import read_metadata  # noqa: E402
from tuners.composition import ALPHA_MODES, DEFAULT_ALPHA_MODE, composed_alphas, composed_step_ranges  # noqa: E402

CELL = 16
TOLERANCE = 2
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
PHOTO_SEEDS = 3
CAPTIONS = {"full": caption, "no-layout": plain_prompt}


def edge_f1(reference: np.ndarray, generated: np.ndarray, tolerance: int = TOLERANCE) -> float:
    """F1 of two binary edge maps, a pixel counting as matched when the other map has an edge within `tolerance` px."""
    if not reference.any() and not generated.any():
        return 1.0
    if not reference.any() or not generated.any():
        return 0.0
    to_reference = cv2.distanceTransform((~reference).astype(np.uint8), cv2.DIST_L2, 3)
    to_generated = cv2.distanceTransform((~generated).astype(np.uint8), cv2.DIST_L2, 3)
    precision = float((to_reference[generated] <= tolerance).mean())
    recall = float((to_generated[reference] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def canny_edges(image: Image.Image) -> np.ndarray:
    return np.asarray(conditions.extract(image, conditions.ConditionRequest("canny", image.size), cache=None).image)[..., 0] > 0


def cell_colours(image: Image.Image, cell: int = CELL) -> np.ndarray:
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = a.shape[0] // cell, a.shape[1] // cell
    return a[: h * cell, : w * cell].reshape(h, cell, w, cell, 3).mean(axis=(1, 3))


def colour_error(condition: Image.Image, generated: Image.Image) -> float:
    """Mean over 16×16 cells of the RGB distance between the cells' mean colours."""
    return float(np.linalg.norm(cell_colours(condition) - cell_colours(generated), axis=-1).mean())


def kept_pixel_error(render: Image.Image, generated: Image.Image, mask: Image.Image) -> float:
    """Mean RGB distance between `render` and `generated` on the pixels `mask` keeps (0 = keep, 255 = generate)."""
    keep = np.asarray(mask) == 0
    distance = np.linalg.norm(np.asarray(render, np.float64) - np.asarray(generated.convert("RGB"), np.float64), axis=-1)
    return float(distance[keep].mean())


def line_drawing(seed: int, size: int) -> Image.Image:
    """10–18 random strokes (lines, polylines, arcs, circles), 1 px white on black: an edge map of many strokes."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(10, 19))):
        kind = rng.choice(["line", "polyline", "arc", "circle"])
        if kind == "line":
            a, b = rng.integers(0, size, (2, 2))
            cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), 255, 1)
        elif kind == "polyline":
            points = rng.integers(0, size, (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.polylines(canvas, [points], bool(rng.random() < 0.5), 255, 1)
        else:
            centre = tuple(map(int, rng.integers(size // 8, size - size // 8, 2)))
            axes = tuple(map(int, rng.integers(size // 16, size // 3, 2)))
            if kind == "circle":
                axes = (axes[0], axes[0])
            start = float(rng.uniform(0, 360))
            end = start + (360 if kind == "circle" else float(rng.uniform(60, 300)))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), start, end, 255, 1)
    return Image.fromarray(canvas).convert("RGB")


def photo_edge_maps(size: int) -> list[tuple[str, Image.Image]]:
    """Canny 100/200 of a centre crop of each of scikit-image's sample photos, at `size` px."""
    from skimage import data

    maps = []
    for name in PHOTOS:
        array = getattr(data, name)()
        photo = Image.fromarray(array).convert("RGB")
        fitted, _ = conditions.fit_image(photo, (size, size), "crop")
        maps.append((name, conditions.extract(fitted, conditions.ConditionRequest("canny", fitted.size), cache=None).image))
    return maps


@dataclass
class Prompt:
    scene: Scene
    text: str
    seed: int
    render: Image.Image

    def condition(self, kind: str) -> Image.Image:
        params = {"ratio": CELL} if kind == "color" else {}
        return conditions.extract(self.render, conditions.ConditionRequest(kind, self.render.size, "crop", params), cache=None).image


class Bench:
    def __init__(self, manager: ModelManager, n: int, steps: int, guidance: float, captions: str = "full") -> None:
        self.manager, self.steps, self.guidance = manager, steps, guidance
        size = manager.native_size
        self.prompts = []
        for i in range(n):
            scene = sample_scene(i, split="heldout")
            self.prompts.append(Prompt(scene, CAPTIONS[captions](scene), i, render_scene(scene, size)))
        self._plain: dict[int, Image.Image] = {}
        self._round_trips: dict[int, Image.Image] = {}

    def generate(
        self, prompt: Prompt, text: str | None = None, sc: tuple[TunerUse, ...] = (), controls: tuple[ConditionUse, ...] = (),
        alpha_mode: str = DEFAULT_ALPHA_MODE,
    ) -> Image.Image:
        request = GenerationRequest(text or prompt.text, seed=prompt.seed, steps=self.steps, guidance=self.guidance, sc_tuners=sc,
                                    conditions=controls, alpha_mode=alpha_mode)
        return self.manager.generate(request).images[0]

    def plain(self, prompt: Prompt) -> Image.Image:
        if prompt.seed not in self._plain:
            self._plain[prompt.seed] = self.generate(prompt)
        return self._plain[prompt.seed]

    @torch.no_grad()
    def round_trip(self, prompt: Prompt) -> Image.Image:
        """The prompt's render through the base model's VAE: the best any generation can look after decoding."""
        if prompt.seed not in self._round_trips:
            pipeline = self.manager.pipeline
            pixels = torch.from_numpy(np.asarray(prompt.render, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            pixels = pixels.to(self.manager.device, pipeline.vae.dtype)
            decoded = pipeline.vae.decode(pipeline.vae.encode(pixels).latent_dist.mean).sample
            array = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            self._round_trips[prompt.seed] = Image.fromarray(array)
        return self._round_trips[prompt.seed]

    def control(self, canny: Path | None, colour: Path | None, alpha: float, alpha_mode: str, canny_until: float = 1.0) -> dict:
        rows: dict[str, list[float]] = {}
        for prompt in self.prompts:
            edges, colours = prompt.condition("canny"), prompt.condition("color")
            reference = np.asarray(edges)[..., 0] > 0
            base = self.plain(prompt)
            decoded = self.round_trip(prompt)
            rows.setdefault("canny_f1_vae_round_trip", []).append(edge_f1(reference, canny_edges(decoded)))
            rows.setdefault("colour_error_vae_round_trip", []).append(colour_error(colours, decoded))
            if canny is not None:
                rows.setdefault("canny_f1_without", []).append(edge_f1(reference, canny_edges(base)))
                image = self.generate(prompt, controls=(ConditionUse(str(canny), edges, 1.0),))
                rows.setdefault("canny_f1_with", []).append(edge_f1(reference, canny_edges(image)))
                # The other condition's measure too: what composing adds over each tuner alone shows on both.
                rows.setdefault("canny_only_colour_error", []).append(colour_error(colours, image))
            if colour is not None:
                rows.setdefault("colour_error_without", []).append(colour_error(colours, base))
                image = self.generate(prompt, controls=(ConditionUse(str(colour), colours, 1.0),))
                rows.setdefault("colour_error_with", []).append(colour_error(colours, image))
                rows.setdefault("colour_only_canny_f1", []).append(edge_f1(reference, canny_edges(image)))
            if canny is not None and colour is not None:
                both = (ConditionUse(str(canny), edges, alpha, step_range=(0.0, canny_until)), ConditionUse(str(colour), colours, alpha))
                image = self.generate(prompt, controls=both, alpha_mode=alpha_mode)
                rows.setdefault("composed_canny_f1", []).append(edge_f1(reference, canny_edges(image)))
                rows.setdefault("composed_colour_error", []).append(colour_error(colours, image))
        return {key: float(np.mean(values)) for key, values in rows.items()}

    def inpaint(self, tuner: Path) -> dict:
        """How well the pixels an inpaint mask keeps are kept: without control, with the tuner, through the VAE."""
        rows: dict[str, list[float]] = {}
        for prompt in self.prompts:
            mask = conditions.random_inpaint_mask(prompt.render.size, np.random.default_rng(prompt.seed))
            masked = conditions.inpaint_condition(prompt.render, mask)
            image = self.generate(prompt, controls=(ConditionUse(str(tuner), masked, 1.0),))
            rows.setdefault("kept_error_without", []).append(kept_pixel_error(prompt.render, self.plain(prompt), mask))
            rows.setdefault("kept_error_with", []).append(kept_pixel_error(prompt.render, image, mask))
            rows.setdefault("kept_error_vae_round_trip", []).append(kept_pixel_error(prompt.render, self.round_trip(prompt), mask))
        return {key: float(np.mean(values)) for key, values in rows.items()}

    def edge_following(self, canny: Path, edge_maps: list[Image.Image]) -> dict:
        """Edge F1 without control and with the canny tuner on edge maps of any origin; map i goes with prompt i."""
        without, with_tuner = [], []
        for i, edges in enumerate(edge_maps):
            prompt = self.prompts[i % len(self.prompts)]
            reference = np.asarray(edges)[..., 0] > 0
            without.append(edge_f1(reference, canny_edges(self.plain(prompt))))
            image = self.generate(prompt, controls=(ConditionUse(str(canny), edges, 1.0),))
            with_tuner.append(edge_f1(reference, canny_edges(image)))
        return {"maps": len(edge_maps), "f1_without": float(np.mean(without)), "f1_with": float(np.mean(with_tuner))}

    def style(self, path: Path) -> dict:
        metadata = read_metadata(path)
        training = metadata.training
        data = training.get("data", "")
        style = data.partition(":")[2]
        config = TrainingConfig(kind="sc", data=data, out=Path("unused.safetensors"), seed=training["seed"],
                                shapes_images=training["dataset_size"])
        train_set = load_training_data(config)
        size = training["resolution"]
        train_score = float(np.mean([style_score(train_set.image(i, size), style) for i in range(train_set.size)]))
        prefix = f"{metadata.trigger_word} " if metadata.trigger_word else ""
        tuned, base, colour_tuned, colour_base = [], [], [], []
        for prompt in self.prompts:
            image = self.generate(prompt, prefix + prompt.text, sc=(TunerUse(str(path), 1.0),))
            tuned.append(style_score(image, style))
            colour_tuned.append(score_adherence(image, prompt.scene).color_correct)
            plain = self.plain(prompt)
            base.append(style_score(plain, style))
            colour_base.append(score_adherence(plain, prompt.scene).color_correct)
        return {
            "style": style,
            "train_images": training["dataset_size"],
            "training_seconds": training.get("training_seconds"),
            "train_score": train_score,
            "score_with": float(np.mean(tuned)),
            "score_without": float(np.mean(base)),
            "score_ratio": float(np.mean(tuned)) / train_score if train_score > 0 else float("nan"),
            "colour_accuracy_with": float(np.mean(colour_tuned)),
            "colour_accuracy_without": float(np.mean(colour_base)),
        }


PARTS = ("canny", "colour", "inpaint", "styles")


def measure(
    model: str, tuners: Path, n: int, steps: int, guidance: float, alpha: float, alpha_mode: str = DEFAULT_ALPHA_MODE,
    parts: Sequence[str] = PARTS, canny_until: float = 1.0, captions: str = "full",
) -> dict:
    manager = ModelManager("auto")
    info = manager.load(model)
    bench = Bench(manager, n, steps, guidance, captions)
    canny, colour = tuners / "canny.safetensors", tuners / "colour.safetensors"
    canny = canny if canny.is_file() and "canny" in parts else None
    colour = colour if colour.is_file() and "colour" in parts else None
    styles = sorted(tuners.glob("style-*.safetensors")) if "styles" in parts else []
    result = {
        "model": info.name, "prompts": n, "captions": captions, "steps": steps, "guidance": guidance, "composition_alpha": alpha,
        "composition_alpha_mode": alpha_mode, "composition_alpha_applied": composed_alphas([alpha, alpha], alpha_mode)[0],
        "composition_canny_steps": composed_step_ranges(["canny", "color"], [alpha, alpha], [(0.0, canny_until), (0.0, 1.0)], alpha_mode)[0],
        "control": bench.control(canny, colour, alpha, alpha_mode, canny_until), "styles": [bench.style(path) for path in styles],
    }
    inpaint = tuners / "inpaint.safetensors"
    if inpaint.is_file() and "inpaint" in parts:
        result["inpaint"] = bench.inpaint(inpaint)
    if canny is not None:
        size = manager.native_size
        drawings = [line_drawing(seed, size) for seed in range(n)]
        photos = [edges for _, edges in photo_edge_maps(size) for _ in range(PHOTO_SEEDS)]
        result["edges"] = {"line_drawings": bench.edge_following(canny, drawings), "photos": bench.edge_following(canny, photos)}
    return result


def print_table(result: dict) -> None:
    print(f"model {result['model']}: {result['prompts']} held-out prompts ({result['captions']} captions), {result['steps']} DDIM steps, "
          f"guidance {result['guidance']}")
    control = result["control"]
    print(f"{'metric':<44}{'without':>10}{'with':>10}  target (VAE round trip of the render: best reachable)")
    if "canny_f1_with" in control:
        print(f"{'canny: edge F1 (2 px)':<44}{control['canny_f1_without']:>10.3f}{control['canny_f1_with']:>10.3f}  "
              f"≥ 0.6 ({control['canny_f1_vae_round_trip']:.3f})")
    if "colour_error_with" in control:
        print(f"{'colour: mean RGB error per 16×16 cell':<44}{control['colour_error_without']:>10.1f}{control['colour_error_with']:>10.1f}  "
              f"lower ({control['colour_error_vae_round_trip']:.1f})")
    if "composed_canny_f1" in control:
        a = (f"α {result['composition_alpha']} each, {result['composition_alpha_mode']}: {result['composition_alpha_applied']:.3g}, "
             f"canny steps {'-'.join(f'{x:g}' for x in result['composition_canny_steps'])}")
        print(f"{f'canny + colour ({a}): edge F1':<44}{control['canny_f1_with']:>10.3f}{control['composed_canny_f1']:>10.3f}  "
              f"close (canny alone → composed; colour alone: {control['colour_only_canny_f1']:.3f})")
        print(f"{f'canny + colour ({a}): colour error':<44}{control['colour_error_with']:>10.1f}{control['composed_colour_error']:>10.1f}  "
              f"close (colour alone → composed; canny alone: {control['canny_only_colour_error']:.1f})")
    if "inpaint" in result:
        row = result["inpaint"]
        print(f"{'inpaint: RGB error on the kept pixels':<44}{row['kept_error_without']:>10.1f}{row['kept_error_with']:>10.1f}  "
              f"lower ({row['kept_error_vae_round_trip']:.1f})")
    for name, row in result.get("edges", {}).items():
        label = f"canny on {name.replace('_', ' ')} ({row['maps']}): edge F1"
        print(f"{label:<44}{row['f1_without']:>10.3f}{row['f1_with']:>10.3f}  gain")
    for s in result["styles"]:
        seconds = s["training_seconds"]
        print(f"style {s['style']!r}: {s['train_images']} training images, {seconds:.0f} s of training")
        print(f"{'  style score (training images ' + format(s['train_score'], '.3f') + ')':<44}{s['score_without']:>10.3f}{s['score_with']:>10.3f}  "
              f"ratio {s['score_ratio']:.2f} (≥ 0.8)")
        print(f"{'  colour accuracy on new prompts':<44}{s['colour_accuracy_without']:>10.3f}{s['colour_accuracy_with']:>10.3f}  ≥ 0.85")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="default: the built-in tiny model")
    parser.add_argument("--tuners", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "tuners")
    parser.add_argument("--n", type=int, default=50, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="α of each tuner in the composition")
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default=DEFAULT_ALPHA_MODE, help="how the two α combine")
    parser.add_argument("--canny-until", type=float, default=1.0, help="the end of the canny condition's step range in the composition")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--captions", choices=CAPTIONS, default="full", help="how the prompts are worded (see above)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(args.model, args.tuners, args.n, args.steps, args.guidance, args.alpha, args.alpha_mode, args.parts.split(","),
                     args.canny_until, args.captions)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
