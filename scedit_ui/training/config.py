"""What decides a training run (`TrainingConfig`), and what a run reports (`TrainingProgress`, `TrainingResult`)."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from scedit_ui import conditions
from tuners import TunerMetadata
from tuners.validation import UserInputError, check_choice, check_number

KINDS = ("sc", "csc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Conditions whose geometry matches the picture (outpaint changes the canvas, so it is trained as inpaint).
TRAINABLE_CONDITIONS = ("canny", "color", "inpaint", "sketch", "scribble", "hed", "depth", "pose", "seg")
DEFAULT_SHAPES_IMAGES = 30
CLUTTER = "shapes+clutter"  # data source: Shapes scenes with unnamed strokes and polygons over them
# torch's AdamW, its fused kernel (one kernel per step: no per-step temporaries), or bitsandbytes' 8-bit AdamW
# (2 bytes of state per trained value instead of 8). bench/train_memory.py counts what each keeps.
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit")
# What a checkpoint must share with the run that resumes it (steps may grow: training continues).
_RESUME_KEYS = (
    "kind", "condition", "condition_params", "data", "trigger", "remove_words", "batch_size", "learning_rate",
    "weight_decay", "resolution", "seed", "down_ratio", "kernel_size", "position_features", "gated", "base_model",
    "shapes_images", "caption_dropout", "preserve_base_above", "init_from",
    "optimizer",  # 8-bit AdamW's state does not load into torch's AdamW
)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a training run. `data` is a folder, "shapes", "shapes:<style>" or "shapes+clutter"."""

    kind: str  # "sc" | "csc"
    data: str
    out: Path
    condition: str | None = None  # CSC only: the condition type (canny, color, inpaint, ...)
    condition_params: tuple[tuple[str, Any], ...] = ()  # fixed extractor parameters (else random / defaults)
    trigger: str | None = None  # prefixed to every caption, e.g. "<sce>"
    remove_words: tuple[str, ...] = ()  # phrases removed from captions, e.g. "in stripes style"
    # Defaults (the CLI's and the Train tab's) chosen by measurement: a style from 10-30 pictures in < 10 min on
    # a 2-core CPU; docs/training.md has the runs behind them.
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-3  # the paper uses 5e-5 at SD scale; 1e-4 showed no style after 300 steps here
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1  # share of captions replaced by "" (trains the unconditional branch of CFG)
    # SC: above this fraction of the noise schedule the loss target is the frozen base model's own prediction
    # (prior preservation), so the tuner leaves the composition and colours a prompt gets from the base alone. 1.0
    # (the default) switches it off: texture guidance keeps the colours now, and preservation above 0.6 held a
    # periodic style to 0.65x of its pictures' where without it the tuner reaches 0.95x (docs/training.md). CSC
    # tuners ignore it (their condition sets the layout).
    preserve_base_above: float = 1.0
    resolution: int | None = None  # None: the base model's native size
    seed: int = 0
    checkpoint_every: int = 100
    preview_every: int = 250  # 0: no previews
    preview_prompts: tuple[str, ...] = ()  # default: captions of the first data examples
    preview_seeds: tuple[int, ...] = (0,)
    preview_steps: int = 20
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # one of OPTIMIZERS
    down_ratio: float = 1.0  # SC: mid width of each adapter = int(C · down_ratio)
    # SC: the adapters' first layer (3: sees neighbours, learns a periodic texture; 1: per pixel, the paper's);
    # CSC: the cascade convs. None: the kind's default (SC 3, CSC 1), chosen by measurement (docs/training.md).
    kernel_size: int | None = None
    # SC: the adapters also read sinusoids of the canvas position (`tuners.sc_tuner.position_features`). None: on
    # for SC, chosen by measurement (docs/training.md); CSC tuners have no such input.
    position_features: bool | None = None
    # SC: gated adapters (`tuners.sc_tuner.SkipAdapter`). None: on for SC, chosen by measurement (docs/training.md).
    gated: bool | None = None
    base_model: str = ""  # "" = the built-in tiny model
    work_dir: Path | None = None  # checkpoints and previews; default runs/tuners/<out name>
    resume: bool = False
    init_from: Path | None = None  # start from this tuner file's weights (same kind and layout) instead of fresh ones
    shapes_images: int | None = None  # Shapes world: distinct scenes (None: 30 for SC, an endless stream for CSC)
    save_dtype: str = "float32"  # "float16" halves the file
    # SC: after training, measure which scale and guidance half show the style best on new prompts and store that as
    # the file's default (32 images per candidate tried; `calibration`). Off: the paper's way, scale 1 on both halves.
    calibrate: bool = True
    device: str = "auto"  # "auto" | "cuda" | "cpu"

    @property
    def kernel(self) -> int:
        """The kernel size this run uses."""
        return self.kernel_size or (3 if self.kind == "sc" else 1)

    @property
    def positions(self) -> bool:
        """Whether this run's SC adapters read position features."""
        return self.kind == "sc" if self.position_features is None else self.position_features

    @property
    def gates(self) -> bool:
        """Whether this run's SC adapters are gated."""
        return self.kind == "sc" if self.gated is None else self.gated

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else Path("runs/tuners") / Path(self.out).stem

    def validated(self) -> TrainingConfig:
        """A normalised copy, or `UserInputError` naming the first bad value. Looks at no file."""
        if self.kind not in KINDS:
            raise UserInputError(f"kind must be 'sc' (style, text-to-image) or 'csc' (condition), got {self.kind!r}")
        if self.kind == "csc":
            if not self.condition:
                raise UserInputError(f"a CSC tuner needs a condition type: one of {', '.join(TRAINABLE_CONDITIONS)}")
            if self.condition not in TRAINABLE_CONDITIONS:
                raise UserInputError(f"cannot train condition {self.condition!r}; choose one of {', '.join(TRAINABLE_CONDITIONS)}")
            kind = conditions.condition_kind(self.condition)
            for name, value in self.condition_params:
                kind.param(name).validate(value)
        elif self.condition or self.condition_params:
            raise UserInputError("--condition is for CSC tuners (--kind csc); an SC tuner learns a style from images alone")
        check_number("steps", self.steps, 1, 10_000_000, integer=True)
        check_number("batch size", self.batch_size, 1, 1024, integer=True)
        check_number("seed", self.seed, 0, 2**32 - 1, integer=True)
        check_number("checkpoint interval", self.checkpoint_every, 1, 10_000_000, integer=True)
        check_number("preview interval", self.preview_every, 0, 10_000_000, integer=True)
        check_number("preview steps", self.preview_steps, 1, 150, integer=True)
        check_number("learning rate", self.learning_rate, 1e-8, 1.0)
        check_number("weight decay", self.weight_decay, 0.0, 10.0)
        check_number("max gradient norm", self.max_grad_norm, 0.0, 1e6)
        check_number("caption dropout", self.caption_dropout, 0.0, 1.0)
        check_number("prior-preservation threshold", self.preserve_base_above, 0.0, 1.0)
        check_number("down ratio", self.down_ratio, 1e-3, 4.0)
        if self.kernel_size not in (None, 1, 3):
            raise UserInputError(f"kernel size must be 1 or 3, got {self.kernel_size!r}")
        if self.position_features and self.kind != "sc":
            raise UserInputError("position features are for SC tuners (--kind sc); a CSC tuner reads its condition image")
        if self.gated and self.kind != "sc":
            raise UserInputError("gated adapters are for SC tuners (--kind sc); a CSC tuner has no such option")
        if self.resolution is not None:
            check_number("resolution", self.resolution, 64, 2048, integer=True)
            if self.resolution % 8:
                raise UserInputError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.shapes_images is not None:
            check_number("number of Shapes-world images", self.shapes_images, 1, 10_000_000, integer=True)
        if self.save_dtype not in ("float32", "float16"):
            raise UserInputError(f"save dtype must be float32 or float16, got {self.save_dtype!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserInputError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if Path(self.out).suffix != ".safetensors":
            raise UserInputError(f"the output must be a .safetensors file, got {self.out}")
        trigger = (self.trigger or "").strip() or None
        remove_words = tuple(w.strip() for w in self.remove_words if w.strip())
        for seed in self.preview_seeds:
            check_number("preview seed", seed, 0, 2**32 - 1, integer=True)
        init_from = Path(self.init_from) if self.init_from else None
        if init_from is not None and init_from.suffix != ".safetensors":
            raise UserInputError(f"--init takes a tuner .safetensors file, got {init_from}")
        return replace(self, out=Path(self.out), init_from=init_from, trigger=trigger, remove_words=remove_words,
                       condition_params=tuple(sorted(dict(self.condition_params).items())))

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint, as JSON-friendly values."""
        # The resolved values: a checkpoint from before position features or gates (None there) must not pass for one with them.
        data = asdict(self) | {"position_features": self.positions, "gated": self.gates}
        return json.loads(json.dumps({key: data[key] for key in _RESUME_KEYS}, default=str))


@dataclass
class TrainingProgress:
    """One finished step; `previews` (and the files they were written to) and `checkpoint` are set on the
    steps that made them. `elapsed_seconds` counts the training time of all sessions of a resumed run."""

    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    elapsed_seconds: float = 0.0
    previews: list[Image.Image] = field(default_factory=list)
    preview_paths: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None


@dataclass
class TrainingResult:
    output: Path | None  # None when cancelled
    steps: int  # steps completed (counting those before a resume)
    cancelled: bool
    checkpoint: Path | None
    loss: float  # mean loss of the last steps
    seconds: float  # training time, all sessions of a resumed run
    metadata: TunerMetadata | None = None
    previews: list[Path] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a multi-process run (they write nothing)


ProgressCallback = Callable[[TrainingProgress], None]


def duration(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour on), as the CLI and the Train tab show elapsed time and time left."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

