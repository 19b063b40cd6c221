"""`python -m scedit_ui SUBCOMMAND ...`: the command-line edge of the app.

Each subcommand parses its arguments and calls the same library functions as the UI and the tests.
A `UserInputError` becomes a one-line message on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tuners.composition import ALPHA_MODES, COMPOSED_ALPHA_CAP, DEFAULT_ALPHA_MODE, EDGE_CONDITION_END
from tuners.validation import UserInputError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scedit_ui", description="SCEdit Studio command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Each subcommand is added by one `_add_<name>_command(subparsers)` function below.
    _add_condition_command(subparsers)
    _add_generate_command(subparsers)
    _add_grid_command(subparsers)
    _add_eval_command(subparsers)
    _add_train_command(subparsers)
    _add_tuners_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path given on the command line that cannot be read or written
        print(f"error: {_describe_os_error(error)}", file=sys.stderr)
        logging.getLogger(__name__).info("where the error above came from", exc_info=error)  # shown with -v
        return 2


def _describe_os_error(error: OSError) -> str:
    """'cannot use FILE: reason', with FILE shortened (a name too long for the file system fills the screen)."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    name = str(error.filename)
    return f"cannot use {name if len(name) <= 100 else name[:100] + '…'}: {reason}"


def _quiet_libraries(verbose: bool) -> None:
    """Keep library progress bars and advice off the terminal unless -v: errors stay one line."""
    if verbose:
        return
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore")
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _add_condition_command(subparsers: argparse._SubParsersAction) -> None:
    from scedit_ui import conditions
    from scedit_ui.conditions import annotators

    command = subparsers.add_parser(
        "condition",
        help="make a condition image (canny, colour, mask, sketch, depth, pose, ...) from a picture",
        description="Make the condition image of KIND from a picture, at the generation size.",
        epilog="kinds and their parameters (set with -p NAME=VALUE):\n" + conditions.describe_kinds(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(conditions.CONDITION_KINDS)}")
    command.add_argument("--in", dest="input", required=True, metavar="IMAGE", help="the picture")
    command.add_argument("--out", required=True, metavar="FILE.png", help="where to write the condition image")
    command.add_argument("--size", metavar="WxH", help="generation size, e.g. 512x512 (default: the picture's size)")
    command.add_argument("--fit", choices=conditions.FIT_MODES, default="crop", help="how the picture is brought to the size")
    command.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="a parameter of KIND (repeatable)")
    command.add_argument("--mask", metavar="IMAGE", help="inpaint: the area to generate, white (or opaque) on black (or transparent)")
    command.add_argument("--mask-out", metavar="FILE.png", help="inpaint/outpaint: also write the mask of the area to generate")
    command.add_argument("--annotators", metavar="DIR", help=f"folder of annotator weights (default: ${annotators.ANNOTATORS_ENV})")

    def run(args: argparse.Namespace) -> int:
        params = conditions.parse_params(args.kind, args.param)
        if args.mask:
            conditions.condition_kind(args.kind).param("mask")  # refuses --mask for kinds that take none
            params["mask"] = conditions.load_mask(args.mask)
        if args.annotators:
            annotators.set_annotators_dir(args.annotators)
        image = conditions.load_image(args.input)
        size = conditions.parse_size(args.size) if args.size else image.size
        result = conditions.extract(image, conditions.ConditionRequest(args.kind, size, args.fit, params), cache=None)
        if args.mask_out and result.mask is None:
            raise UserInputError(f"{args.kind} makes no mask; --mask-out is for inpaint and outpaint")
        conditions.save_image(result.image, args.out)
        if args.mask_out:
            conditions.save_image(result.mask, args.mask_out)
        return 0

    command.set_defaults(handler=run)


def _split_suffix_number(spec: str, default: float | None = 1.0) -> tuple[str, float | None]:
    """'NAME:1.5' -> ('NAME', 1.5); 'NAME' -> ('NAME', default)."""
    head, _, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if head else (spec, default)
    except ValueError:
        return spec, default


def _add_model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default="", metavar="PATH_OR_ID", help="diffusers folder, .safetensors file or hub id (default: built-in tiny model)")
    command.add_argument("--config", metavar="FOLDER", help="for a single-file checkpoint: a diffusers folder with its configs")
    command.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))


def _add_generation_options(command: argparse.ArgumentParser) -> None:
    """What one image asks for: shared by `generate` and `grid`."""
    from scedit_ui.request import SCHEDULERS
    from tuners import SKIP_WEIGHT_PRESETS

    command.add_argument("--prompt", required=True)
    command.add_argument("--negative", default="", help="negative prompt")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--steps", type=int, default=20)
    command.add_argument("--guidance", type=float, default=5.0)
    command.add_argument("--size", metavar="WxH", help="default: the model's native size")
    command.add_argument("--scheduler", default="DDIM", help=f"one of: {', '.join(SCHEDULERS)}")
    command.add_argument(
        "--tuner", action="append", default=[], metavar="FILE[:SCALE]",
        help="SC tuner (file or library name), repeatable; without SCALE, the file's default scale (1 unless it says otherwise)",
    )
    halves = command.add_mutually_exclusive_group()
    halves.add_argument(
        "--conditional-only", action="store_const", const=True, dest="conditional_only",
        help="apply the SC tuners to the prompt's half of classifier-free guidance only, so guidance amplifies their style",
    )
    halves.add_argument(
        "--both-halves", action="store_const", const=False, dest="conditional_only",
        help="apply the SC tuners to both halves of guidance (default: as each file says; the paper's way unless it says otherwise)",
    )
    halves.add_argument(
        "--texture-guidance", action="store_true", default=None, dest="texture",
        help="add each SC tuner's fine texture at its scale and keep the base model's colours and layout (one larger UNet batch)",
    )
    command.add_argument("--control", action="append", default=[], metavar="TUNER:IMAGE[:ALPHA]", help="CSC tuner and the picture to extract its condition from, repeatable")
    command.add_argument("--raw-control", action="store_true", help="the --control images are condition images already (no extraction)")
    command.add_argument(
        "--mask", action="append", default=[], metavar="IMAGE|none",
        help="spatial α map of the n-th --control (white: full α, black: none; stretched to the image size), repeatable in --control order",
    )
    command.add_argument(
        "--skip-alpha", action="append", default=[], metavar="PRESET|W,W,...",
        help=f"per-skip α of the n-th --control: one of {', '.join(repr(p) for p in SKIP_WEIGHT_PRESETS)}, "
        "or one weight per skip (encoder order), repeatable in --control order",
    )
    command.add_argument(
        "--alpha-mode", choices=ALPHA_MODES, default=DEFAULT_ALPHA_MODE,
        help=f"how several controls combine: staged (α as given; an edge control beside a colour or inpaint one ends at "
        f"{EDGE_CONDITION_END:g} of the steps), cap (α scaled down to sum to at most {COMPOSED_ALPHA_CAP:g}; one control keeps "
        "its α), normalise (Σα = 1, the paper) or raw (as given)",
    )
    command.add_argument("--rho-inner", type=float, help="Skip-Tuning: ρ of the innermost skip (linear from --rho-outer)")
    command.add_argument("--rho-outer", type=float, default=1.0)
    command.add_argument("--freeu", action="store_true", help="FreeU with the preset for the model family")
    command.add_argument("--library", default="library", metavar="DIR", help="tuner library folder")
    _add_model_options(command)


def _request_from_args(args: argparse.Namespace, batch_size: int = 1, check: Callable[[object], None] | None = None):
    """The `GenerationRequest` the options ask for and the loaded `ModelManager`; bad values fail before loading.

    `check` sees the request before the model loads (the grid checks its axes against it there).
    """
    from dataclasses import replace

    from scedit_ui import conditions
    from scedit_ui.model_manager import ModelManager
    from scedit_ui.request import ConditionUse, GenerationRequest, SkipTuningSettings, TunerUse
    from scedit_ui.tuner_library import TunerLibrary
    from scedit_ui.use_cases import ConditionRow, with_controls
    from tuners import read_metadata

    library = TunerLibrary(args.library)
    width, height = conditions.parse_size(args.size) if args.size else (None, None)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps, guidance=args.guidance,
        width=width, height=height, scheduler=args.scheduler, batch_size=batch_size,
        sc_tuners=tuple(
            TunerUse.of_file(library.resolve(name), scale, args.conditional_only, args.texture)
            for name, scale in (_split_suffix_number(spec, None) for spec in args.tuner)
        ),
        alpha_mode=args.alpha_mode,
        skip_tuning=SkipTuningSettings(args.rho_outer, args.rho_inner) if args.rho_inner is not None else None,
    )
    request.validated(native_size=512)  # fail on bad values before loading anything; 512 only fills unset sizes
    for option, values in (("--mask", args.mask), ("--skip-alpha", args.skip_alpha)):
        if len(values) > len(args.control):
            raise UserInputError(f"{option} is given {len(values)} times for {len(args.control)} --control; give one per --control, in order")
    controls = []
    for k, spec in enumerate(args.control):
        head, alpha = _split_suffix_number(spec)
        tuner_name, _, image_path = head.partition(":")
        if not image_path:
            raise UserInputError(f"--control needs TUNER:IMAGE[:ALPHA], got {spec!r}")
        mask = args.mask[k] if k < len(args.mask) and args.mask[k].lower() != "none" else None
        controls.append((library.resolve(tuner_name), conditions.load_image(image_path), alpha,
                         conditions.load_image(mask) if mask else None, args.skip_alpha[k] if k < len(args.skip_alpha) else None))
    if check is not None:
        check(replace(request, conditions=tuple(ConditionUse(str(c[0]), c[1], c[2]) for c in controls)))
    manager = ModelManager(args.device)
    manager.load(args.model, args.config)
    request = replace(request, width=width or manager.native_size, height=height or manager.native_size,
                      freeu=manager.freeu_preset() if args.freeu else None)
    for tuner_path, picture, alpha, mask, skip_alpha in controls:
        skip_weights = _skip_weights(skip_alpha, manager.editor.layout) if skip_alpha else None
        if args.raw_control:  # the picture is the condition image
            use = ConditionUse(str(tuner_path), picture, alpha, mask=mask, skip_weights=skip_weights)
            request = replace(request, conditions=request.conditions + (use,))
        else:
            row = ConditionRow(read_metadata(tuner_path).condition_type, {}, tuner_path, alpha, mask=mask, skip_weights=skip_weights)
            request, _ = with_controls(request, picture, [row], alpha_mode=args.alpha_mode)
    return request, manager


def _skip_weights(spec: str, layout) -> tuple[float, ...]:
    """A preset name or comma-separated weights, as per-skip α for `layout`."""
    from tuners import SKIP_WEIGHT_PRESETS, skip_weight_preset

    if spec in SKIP_WEIGHT_PRESETS:
        return skip_weight_preset(layout, spec)
    try:
        return tuple(float(w) for w in spec.split(","))
    except ValueError:
        raise UserInputError(
            f"--skip-alpha {spec!r} is neither a preset ({', '.join(SKIP_WEIGHT_PRESETS)}) nor {layout.num_skips} comma-separated numbers"
        ) from None


def _add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser("generate", help="generate images (PNG with the parameters in its metadata)")
    command.add_argument("--out", required=True, metavar="FILE.png", help="output; a batch writes FILE-0.png, FILE-1.png, ...")
    command.add_argument("--batch", type=int, default=1)
    _add_generation_options(command)

    def run(args: argparse.Namespace) -> int:
        from scedit_ui.request import save_png

        request, manager = _request_from_args(args, batch_size=args.batch)
        result = manager.generate(request)
        for notice in result.notices:
            print(f"note: {notice}", file=sys.stderr)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
            save_png(image, str(path))
            print(path)
        return 0

    command.set_defaults(handler=run)


def _add_grid_command(subparsers: argparse._SubParsersAction) -> None:
    from scedit_ui.use_cases import GRID_AXES

    command = subparsers.add_parser(
        "grid",
        help="X/Y(/Z) compare grid: one labelled grid PNG plus every image, each with its recipe in the metadata",
        description="Generate one image per combination of the axis values (X varies fastest) with the options below as the base.",
        epilog=f"axes: {', '.join(GRID_AXES)}\nexample: --x 'SC scale=0,0.5,1' --y 'seed=1,2' --z 'prompt S/R=red,green'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for axis in ("x", "y", "z"):
        command.add_argument(
            f"--{axis}", required=axis == "x", metavar="AXIS=V1,V2,...",
            help="step ranges as 0-0.5; prompt S/R: the first value is the text to replace" if axis == "x" else None,
        )
    command.add_argument("--target", type=int, default=1, help="SC scale / CSC α / step range axes vary this tuner or control (1 = the first)")
    command.add_argument("--out", required=True, metavar="DIR", help="writes DIR/grid.png and DIR/grid-NN.png")
    _add_generation_options(command)

    def run(args: argparse.Namespace) -> int:
        from scedit_ui.use_cases import grid_requests, parse_axis, run_grid, save_grid

        axes = []
        for name in ("x", "y", "z"):
            spec = getattr(args, name)
            if spec is None:
                continue
            kind, separator, values = spec.partition("=")
            if not separator:
                raise UserInputError(f"--{name} needs AXIS=VALUES, for example 'seed=1,2,3'; got {spec!r}")
            axes.append(parse_axis(kind.strip(), values, args.target - 1))
        request, manager = _request_from_args(args, check=lambda base: grid_requests(base, axes))

        def report(done: int, total: int) -> None:
            if args.verbose:
                print(f"{done}/{total} steps", file=sys.stderr)

        result = run_grid(manager.generate, request, axes, progress=report)
        for path in save_grid(result, Path(args.out)):
            print(path)
        return 0

    command.set_defaults(handler=run)


def _add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    from scedit_ui.shapes.evaluation import PROMPT_SETS

    command = subparsers.add_parser("eval", help="measure the base model with the Shapes-world checker")
    metrics = command.add_subparsers(dest="metric", required=True)
    adherence = metrics.add_parser("adherence", help="colour/shape/position/count accuracy on Shapes-world prompts")
    adherence.add_argument("--n", type=int, default=200, help="number of prompts")
    adherence.add_argument(
        "--prompts", choices=PROMPT_SETS, default="heldout",
        help="heldout: held-out scenes of 1-3 shapes, positions named; plain: one shape, no position ('a red circle on a white background')",
    )
    adherence.add_argument("--seed", type=int, default=0)
    adherence.add_argument("--steps", type=int, default=20)
    adherence.add_argument("--guidance", type=float, default=5.0)
    adherence.add_argument("--json", action="store_true")
    _add_model_options(adherence)

    def run(args: argparse.Namespace) -> int:
        import json

        from scedit_ui.model_manager import ModelManager
        from scedit_ui.request import GenerationRequest
        from scedit_ui.use_cases import measure_adherence

        if args.n < 1:
            raise UserInputError(f"--n must be at least 1, got {args.n}")
        manager = ModelManager(args.device)
        manager.load(args.model, args.config)
        request = GenerationRequest(prompt="", steps=args.steps, guidance=args.guidance)
        report = measure_adherence(manager.generate, request, args.n, args.seed, args.prompts)
        values = {"steps": args.steps, "guidance": args.guidance, **report.to_dict()}
        if args.json:
            print(json.dumps(values, indent=2))
        else:
            def shown(value) -> str:
                if isinstance(value, list):  # per clause
                    return " / ".join(shown(v) for v in value) or "-"
                return f"{value:.3f}" if isinstance(value, float) else str(value)

            for key, value in values.items():
                print(f"{key:<25} {shown(value)}")
        return 0

    command.set_defaults(handler=run)


def _add_tuners_command(subparsers: argparse._SubParsersAction) -> None:
    from scedit_ui.tuner_library import HUB_BASES, OFFICIAL_REPO

    command = subparsers.add_parser(
        "tuners",
        help="import, fetch from the hub, or export tuners (official SCEdit layout)",
        description="Official SCEdit tuners (SCEPTER, ms-swift) in and out of the tuner library. Official files are "
        "converted for a base: --base names one (sd15, sd21, sdxl) without loading its weights.",
    )
    actions = command.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser("fetch", help="download an official tuner from the Hugging Face Hub into the library")
    fetch.add_argument("subfolder", metavar="SUBFOLDER", help="folder in the repository, e.g. controllable_model/SD2.1/canny_control")
    fetch.add_argument("--repo", default=OFFICIAL_REPO, help=f"hub id (default: {OFFICIAL_REPO})")
    imports = actions.add_parser("import", help="import a tuner file or an official checkpoint (file or folder) into the library")
    imports.add_argument("source", metavar="PATH")
    for action in (fetch, imports):
        action.add_argument("--base", choices=("sd15", "sd21", "sdxl"),
                            help=f"base the tuner is for (fetch: default from the folder name, {', '.join(HUB_BASES)})")
        action.add_argument("--name", help="name in the library (default: from the folder or file)")
        action.add_argument("--condition", help="condition type of a CSC tuner (default: from its files or folder name)")
    export = actions.add_parser("export", help="write a library tuner as SCEPTER lays it out (FOLDER/0_SwiftSCETuning/...)")
    export.add_argument("name", metavar="NAME")
    export.add_argument("--out", required=True, metavar="FOLDER", help="a new or empty folder")
    for action in (fetch, imports, export):
        action.add_argument("--library", default="library", metavar="DIR", help="tuner library folder")

    def run(args: argparse.Namespace) -> int:
        from scedit_ui.tuner_library import TunerLibrary
        from tuners import SkipLayout
        from tuners.reference_configs import REFERENCE_UNET_CONFIGS

        library = TunerLibrary(args.library)
        if args.action == "export":
            print(library.export_official(args.name, args.out))
            return 0
        layout = SkipLayout.from_config(REFERENCE_UNET_CONFIGS[args.base]) if args.base else None
        if args.action == "fetch":
            path = library.fetch(args.subfolder, args.repo, layout, args.base, args.name, args.condition)
        else:
            path = library.import_file(args.source, args.name, layout, args.base or "unknown", args.condition)
        print(path)
        return 0

    command.set_defaults(handler=run)


def _add_train_command(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "train",
        help="train an SC tuner (style) or a CSC tuner (condition) on a folder of captioned images or the Shapes world",
        description="Train a tuner on a frozen base model. Runs on one process, or on several GPUs/machines with "
        "`accelerate launch -m scedit_ui train ...` (the same code). Ctrl-C stops within one step and keeps a checkpoint.",
    )
    command.add_argument("--kind", required=True, choices=("sc", "csc"), help="sc: few-shot style; csc: one condition type")
    command.add_argument("--condition", help="csc: the condition type (canny, color, inpaint, sketch, scribble, hed, depth, pose, seg)")
    command.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="csc: fixed condition parameter (default: random augmentation)")
    command.add_argument("--data", required=True, metavar="DIR", help="images with NAME.txt captions or metadata.jsonl; or shapes, shapes:STYLE")
    # Unset settings take TrainingConfig's defaults, the ones the Train tab shows (not repeated here: one source).
    command.add_argument("--steps", type=int)
    command.add_argument("--out", required=True, metavar="FILE.safetensors")
    command.add_argument("--trigger", metavar="WORD", help="prefixed to every caption, e.g. '<sce>'")
    command.add_argument("--remove-word", action="append", default=[], metavar="PHRASE", help="phrase removed from captions (repeatable)")
    command.add_argument("--resume", action="store_true", help="continue from the checkpoint in the work dir")
    command.add_argument("--init", metavar="FILE.safetensors",
                         help="start from this tuner's weights (same kind, condition and layout): continue or fine-tune it")
    command.add_argument("--work-dir", metavar="DIR", help="checkpoints and previews (default: runs/tuners/<out name>)")
    command.add_argument("--batch", type=int)
    command.add_argument("--lr", type=float, help="AdamW learning rate (paper: 5e-5)")
    command.add_argument("--resolution", type=int, help="default: the base model's native size")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--caption-dropout", type=float)
    command.add_argument(
        "--preserve-base-above", type=float, metavar="FRACTION",
        help="sc: above this fraction of the noise schedule the target is the base model's own prediction, so the "
        "style keeps the prompt's composition and colours (1, the default: off; texture guidance keeps the colours)",
    )
    command.add_argument("--images", type=int, help="Shapes world: number of scenes (default: 30 for sc, endless for csc)")
    command.add_argument("--checkpoint-every", type=int)
    command.add_argument("--preview-every", type=int, help="0: no previews")
    command.add_argument("--preview-prompt", action="append", default=[], metavar="TEXT")
    command.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the decoder blocks (less memory, slower)")
    command.add_argument(
        "--optimizer", default="adamw",
        help="adamw (default); adamw-fused: one kernel per step; adamw-8bit: bitsandbytes on a CUDA GPU, a quarter of the state",
    )
    command.add_argument("--down-ratio", type=float, default=1.0, help="sc: adapter mid width / channels")
    command.add_argument("--kernel", type=int, choices=(1, 3), help="sc: adapter kernel (default 3: learns textures; 1: the paper's, per pixel); csc: cascade conv kernel (default 1)")
    command.add_argument(
        "--position-features", action=argparse.BooleanOptionalAction, default=None,
        help="sc: the adapters also see where they are on the canvas, so a periodic style is drawn, not grown from the "
        "noise (default: on; off for the paper's adapters or to continue a file without them)",
    )
    command.add_argument(
        "--gated", action=argparse.BooleanOptionalAction, default=None,
        help="sc: gated adapters (hidden features times a second map of the skip), so a pattern's light/dark rule is one term "
        "(default: on; off for the paper's adapters or to continue a file without a gate)",
    )
    command.add_argument("--fp16", action="store_true", help="save fp16 weights (half the file)")
    command.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false",
        help="sc: skip measuring the default scale and way of applying it after training (about 40 images); the file then says scale 1, both halves",
    )
    command.add_argument("--threads", type=int, help="CPU threads for torch")
    command.add_argument("--model", default="", metavar="PATH_OR_ID", help="base model (default: built-in tiny model)")
    command.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))

    def run(args: argparse.Namespace) -> int:
        import signal
        import threading

        from scedit_ui import conditions
        from scedit_ui.training import TrainingConfig, TrainingProgress, TunerTrainer, duration
        from scedit_ui.training.calibration import describe_default

        params = conditions.parse_params(args.condition, args.param) if args.condition and args.param else {}
        if args.param and not args.condition:
            raise UserInputError("-p/--param sets condition parameters; it needs --condition")
        config = TrainingConfig(
            kind=args.kind, data=args.data, out=Path(args.out), condition=args.condition, condition_params=tuple(params.items()),
            trigger=args.trigger, remove_words=tuple(args.remove_word), resolution=args.resolution, seed=args.seed,
            preview_prompts=tuple(args.preview_prompt),
            gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, down_ratio=args.down_ratio,
            kernel_size=args.kernel, position_features=args.position_features, gated=args.gated,
            base_model=args.model, work_dir=Path(args.work_dir) if args.work_dir else None, resume=args.resume,
            init_from=Path(args.init) if args.init else None,
            shapes_images=args.images, save_dtype="float16" if args.fp16 else "float32", device=args.device, calibrate=args.calibrate,
            **_given(steps=args.steps, batch_size=args.batch, learning_rate=args.lr, caption_dropout=args.caption_dropout,
                     preserve_base_above=args.preserve_base_above, checkpoint_every=args.checkpoint_every,
                     preview_every=args.preview_every),
        ).validated()
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        cancel = threading.Event()
        previous_handler = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # stop after this step, keep a checkpoint
        every = max(1, config.steps // 100)
        announced = False

        def report(event: TrainingProgress) -> None:
            nonlocal announced
            if not announced:  # after the checks of data, settings and checkpoint: an error stays the only line
                announced = True
                print(f"training {trainer.data.description}: {config.steps} steps; checkpoints and previews in {config.work}",
                      file=sys.stderr)
            if event.step % every == 0 or event.checkpoint or event.previews or event.step == event.total_steps:
                saved = f", checkpoint {event.checkpoint}" if event.checkpoint else ""
                print(f"step {event.step}/{event.total_steps} loss {event.loss:.4f} eta {duration(event.eta_seconds)} "
                      f"elapsed {duration(event.elapsed_seconds)}{saved}", file=sys.stderr)
            if event.preview_paths:
                print(f"  previews: {' '.join(map(str, event.preview_paths))}", file=sys.stderr)

        try:
            trainer = TunerTrainer(config)
            result = trainer.run(report, cancel)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        if result.cancelled:
            if result.main_process:
                print(f"cancelled after step {result.steps}; checkpoint {result.checkpoint}; continue with --resume", file=sys.stderr)
            return 130
        if result.main_process:
            if note := describe_default(result.metadata):
                print(note, file=sys.stderr)
            print(result.output)
        return 0

    command.set_defaults(handler=run)


def _given(**settings: object) -> dict[str, object]:
    """The settings the user passed; the others keep their dataclass defaults."""
    return {name: value for name, value in settings.items() if value is not None}
