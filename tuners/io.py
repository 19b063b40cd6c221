"""Tuner files: safetensors weights plus one JSON metadata entry. No pickle is ever read here.

`save_tuner` / `load_tuner` are the one door for this project's files: the metadata holds the tuner's
config (`SCTunerConfig` / `CSCTunerConfig`), and `tuner_from_config` builds the module from it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tuners.csc_tuner import CSCTuner, CSCTunerConfig
from tuners.layout import SkipShape
from tuners.sc_tuner import SCTuner, SCTunerConfig

FORMAT = "scedit-tuner"
# 2: CSC hint widths, down ratio and scale (files of version 1 get the reference defaults);
# 3: how an SC tuner is applied when the user does not say (default_scale, default_conditional_only);
# 4: SC tuners with 3×3 adapters (kernel_size; absent or null: 1) and texture guidance as a default use;
# 5: SC adapters that read position features (position_features; absent or null: no);
# 6: gated SC adapters (gated; absent or null: no).
VERSION = 6
METADATA_KEY = "scedit"

Tuner = SCTuner | CSCTuner
TunerConfig = SCTunerConfig | CSCTunerConfig


class TunerFileError(ValueError):
    """A file that is not a readable tuner of this format."""


def tuner_from_config(config: TunerConfig) -> Tuner:
    """An untrained tuner of the kind and shape `config` describes."""
    return SCTuner.from_config(config) if isinstance(config, SCTunerConfig) else CSCTuner.from_config(config)


_CSC_FIELDS = ("kernel_size", "hint_in_channels", "hint_channels", "hint_dim_ratio", "scale")


@dataclass
class TunerMetadata:
    """What a tuner file says about itself (stored as JSON in the safetensors header): the tuner's
    config plus where it came from. The CSC-only fields are None for SC tuners."""

    kind: str  # "sc" | "csc"
    base_architecture: str
    skip_channels: tuple[int, ...]
    skip_downsample: tuple[bool, ...]
    down_ratio: float = 1.0
    kernel_size: int | None = None
    position_features: bool | None = None  # SC only
    gated: bool | None = None  # SC only
    condition_type: str | None = None
    hint_in_channels: int | None = None
    hint_channels: int | None = None
    hint_dim_ratio: float | None = None
    scale: float | None = None
    trigger_word: str | None = None
    # SC: the scale and guidance half a generation uses when the user names only the file (docs/training.md:
    # a style learned from uncaptioned pictures shows only as style guidance).
    default_scale: float = 1.0
    default_conditional_only: bool = False
    default_texture: bool = False  # texture guidance (tuners.editor); never together with default_conditional_only
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    @property
    def shape(self) -> SkipShape:
        return SkipShape(tuple(self.skip_channels), tuple(self.skip_downsample))

    def tuner_config(self) -> TunerConfig:
        """The config this file's tuner is built from; `ValueError` when a value is out of range."""
        if self.kind == "sc":
            return SCTunerConfig(self.shape, self.down_ratio, self.kernel_size or 1, bool(self.position_features), bool(self.gated))
        if self.kind == "csc":
            given = {name: getattr(self, name) for name in _CSC_FIELDS if getattr(self, name) is not None}
            return CSCTunerConfig(self.shape, condition_type=self.condition_type or "unknown", down_ratio=self.down_ratio, **given)
        raise ValueError(f"unknown tuner kind {self.kind!r} (expected 'sc' or 'csc')")

    @classmethod
    def describe(cls, tuner: Tuner, base_architecture: str, **extra: Any) -> TunerMetadata:
        """Metadata for `tuner` (its config) made for `base_architecture`; `extra` sets the other fields."""
        config = tuner.config
        common = dict(
            base_architecture=base_architecture, skip_channels=config.shape.channels,
            skip_downsample=config.shape.is_downsample, down_ratio=config.down_ratio,
        )
        if isinstance(config, SCTunerConfig):
            return cls(kind="sc", kernel_size=config.kernel_size, position_features=config.position_features, gated=config.gated,
                       **common, **extra)
        csc = {name: getattr(config, name) for name in _CSC_FIELDS}
        return cls(kind="csc", condition_type=config.condition_type, **csc, **common, **extra)

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
        for name in ("base_architecture", "condition_type", "trigger_word"):
            if not isinstance(data.get(name, ""), (str, type(None))):
                raise TunerFileError(f"{name} must be text, got {data[name]!r}")
        scale = data.get("default_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TunerFileError(f"default_scale must be a number, got {scale!r}")
        for name in ("default_conditional_only", "default_texture"):
            if not isinstance(data.get(name, False), bool):
                raise TunerFileError(f"{name} must be true or false, got {data[name]!r}")
        for name in ("position_features", "gated"):
            if not isinstance(data.get(name), (bool, type(None))):
                raise TunerFileError(f"{name} must be true or false, got {data[name]!r}")
        if data.get("default_conditional_only") and data.get("default_texture"):
            raise TunerFileError("default_conditional_only and default_texture cannot both be true")
        if not isinstance(data.get("training", {}), dict):
            raise TunerFileError(f"training must be an object, got {data['training']!r}")
        data["skip_channels"] = tuple(channels)
        data["skip_downsample"] = tuple(downsample)
        try:
            metadata = cls(**data)
        except TypeError as error:  # a required field is missing
            raise TunerFileError(f"metadata is incomplete: {error}") from error
        try:
            metadata.tuner_config()  # the numbers' ranges are the tuner config's to check
        except ValueError as error:
            raise TunerFileError(str(error)) from error
        return metadata


def new_file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, then rename over `path`: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temporary)
        os.chmod(temporary, new_file_mode())  # mkstemp makes the file private (0600)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_tuner(tuner: Tuner, path: str | Path, metadata: TunerMetadata) -> None:
    """Write `tuner` with `metadata` (from `TunerMetadata.describe`) atomically as one safetensors file."""
    if metadata.tuner_config() != tuner.config:
        raise ValueError(f"metadata describes {metadata.tuner_config()}, but the tuner is {tuner.config}")
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


def load_tuner(path: str | Path, shape: SkipShape | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tuner, TunerMetadata]:
    """Load a tuner file; with `shape` (the UNet's skips), refuse one made for other skips, naming both."""
    path = Path(path)
    metadata = read_metadata(path)
    if shape is not None:
        shape.check_matches(metadata.shape, f"tuner file {path.name}")
    tuner = tuner_from_config(metadata.tuner_config())
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
