"""Tuner files: safetensors weights plus one JSON metadata entry. No pickle is ever read here."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tuners.csc_tuner import CSCTuner
from tuners.layout import SkipLayout
from tuners.sc_tuner import SCTuner

FORMAT = "scedit-tuner"
VERSION = 1
METADATA_KEY = "scedit"

Tuner = SCTuner | CSCTuner


class TunerFileError(ValueError):
    """A file that is not a readable tuner of this format."""


@dataclass
class TunerMetadata:
    """What a tuner file says about itself (stored as JSON in the safetensors header)."""

    kind: str  # "sc" | "csc"
    base_architecture: str
    skip_channels: tuple[int, ...]
    skip_downsample: tuple[bool, ...]
    down_ratio: float = 1.0
    kernel_size: int | None = None
    condition_type: str | None = None
    trigger_word: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    @property
    def layout(self) -> SkipLayout:
        # Up-block grouping does not affect the tuner's weights; a single group keeps the layout comparable.
        return SkipLayout(self.skip_channels, self.skip_downsample, (tuple(range(len(self.skip_channels))),))

    @classmethod
    def describe(cls, tuner: Tuner, base_architecture: str, **extra: Any) -> TunerMetadata:
        layout = tuner.layout
        common = dict(base_architecture=base_architecture, skip_channels=layout.channels, skip_downsample=layout.is_downsample)
        if isinstance(tuner, SCTuner):
            return cls(kind="sc", down_ratio=tuner.down_ratio, **common, **extra)
        return cls(kind="csc", kernel_size=tuner.kernel_size, condition_type=tuner.condition_type, **common, **extra)

    @classmethod
    def from_json(cls, text: str) -> TunerMetadata:
        """Parse and check the metadata entry: a file may come from anywhere, so every field is checked."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TunerFileError(f"metadata is a JSON {type(data).__name__}, expected an object")
        if data.get("format") != FORMAT:
            raise TunerFileError(f"metadata format is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("version", 0)
        if not _is_int(version):
            raise TunerFileError(f"metadata version must be a whole number, got {version!r}")
        if version > VERSION:
            raise TunerFileError(f"tuner file version {version} is newer than this program ({VERSION}); upgrade")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TunerFileError(f"metadata has unknown fields: {', '.join(unknown)}")
        channels, downsample = data.get("skip_channels"), data.get("skip_downsample")
        if not (isinstance(channels, list) and channels and all(_is_int(c) and c > 0 for c in channels)):
            raise TunerFileError(f"skip_channels must be a list of positive whole numbers, got {channels!r}")
        if not (isinstance(downsample, list) and len(downsample) == len(channels) and all(isinstance(d, bool) for d in downsample)):
            raise TunerFileError(f"skip_downsample must be {len(channels)} true/false values, got {downsample!r}")
        ratio, kernel = data.get("down_ratio", 1.0), data.get("kernel_size")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 4:
            raise TunerFileError(f"down_ratio must be a number in (0, 4], got {ratio!r}")
        if kernel not in (None, 1, 3):
            raise TunerFileError(f"kernel_size must be 1 or 3, got {kernel!r}")
        for name in ("base_architecture", "condition_type", "trigger_word"):
            if not isinstance(data.get(name, ""), (str, type(None))):
                raise TunerFileError(f"{name} must be text, got {data[name]!r}")
        if not isinstance(data.get("training", {}), dict):
            raise TunerFileError(f"training must be an object, got {data['training']!r}")
        data["skip_channels"] = tuple(channels)
        data["skip_downsample"] = tuple(downsample)
        try:
            return cls(**data)
        except TypeError as error:  # a required field is missing
            raise TunerFileError(f"metadata is incomplete: {error}") from error


def build_tuner(metadata: TunerMetadata, layout: SkipLayout | None = None) -> Tuner:
    """An untrained tuner shaped as `metadata` says, on `layout` (default: the file's own skips)."""
    layout = layout or metadata.layout
    if metadata.kind == "sc":
        return SCTuner(layout, metadata.down_ratio)
    if metadata.kind == "csc":
        return CSCTuner(layout, metadata.kernel_size or 1, metadata.condition_type or "unknown")
    raise TunerFileError(f"unknown tuner kind {metadata.kind!r} (expected 'sc' or 'csc')")


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, then rename over `path`: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_tuner(tuner: Tuner, path: str | Path, metadata: TunerMetadata) -> None:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tuner.state_dict().items()}
    header = {METADATA_KEY: json.dumps(asdict(metadata))}
    atomic_write(Path(path), lambda temporary: save_file(tensors, temporary, metadata=header))


def read_metadata(path: str | Path) -> TunerMetadata:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise TunerFileError(f"{path.name} is not a readable safetensors file: {error}") from error
    if METADATA_KEY not in header:
        raise TunerFileError(f"{path.name} has no SCEdit metadata; import official checkpoints with the import command")
    try:
        return TunerMetadata.from_json(header[METADATA_KEY])
    except (TunerFileError, json.JSONDecodeError, TypeError, KeyError) as error:
        raise TunerFileError(f"{path.name} has unreadable SCEdit metadata: {error}") from error


def load_tuner(path: str | Path, layout: SkipLayout | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tuner, TunerMetadata]:
    """Load a tuner file; with `layout`, refuse (naming both layouts) a tuner made for other skips."""
    path = Path(path)
    metadata = read_metadata(path)
    if layout is not None:
        layout.check_matches(metadata.layout, f"tuner file {path.name}")
    tuner = build_tuner(metadata, layout)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise TunerFileError(f"{path.name} is not a readable safetensors file: {error}") from error
    load_exactly(tuner, state, f"{path.name}: weights do not fit its own metadata")
    return tuner.to(dtype), metadata


def load_exactly(tuner: Tuner, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `tuner`, or `TunerFileError` starting with `what` that names the first differences.

    PyTorch's own message lists every missing key; a file for another layout would fill a screen.
    """
    expected = tuner.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {label} (first: {keys[0]})" for label, keys in
        (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of the wrong shape", mismatched)) if keys
    ]
    if problems:
        raise TunerFileError(f"{what}: {'; '.join(problems)}")
    tuner.load_state_dict(state, strict=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
