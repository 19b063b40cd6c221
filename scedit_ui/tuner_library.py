"""Where tuner files live: the user's library folder, then the tuners shipped in assets/tuners.

Management (import, fetch from the hub, rename, delete, export) only ever writes inside the library
folder: names are sanitised to a plain file stem, shipped tuners are read-only, every write is atomic,
and a file that cannot be imported writes nothing.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open

from scedit_ui.hub import hub_offline
from scedit_ui.model_manager import ASSETS
from tuners import LayoutMismatchError, SkipLayout, TunerFileError, TunerMetadata, load_tuner, read_metadata, save_tuner
from tuners.io import METADATA_KEY, Tuner, atomic_write
from tuners.official import OFFICIAL_FILES, export_official, import_official
from tuners.reference_configs import REFERENCE_UNET_CONFIGS
from tuners.validation import UserInputError

SHIPPED_TUNERS = ASSETS / "tuners"
OFFICIAL_REPO = "scepter-studio/scepter_scedit"  # the SCEdit release on the Hugging Face Hub
# Base-model folder names of the official release (e.g. controllable_model/SD2.1/canny_control).
HUB_BASES = {"SD1.5": "sd15", "SD2.1": "sd21", "SD_XL1.0": "sdxl"}
BASE_NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}
DEFAULT_LIBRARY = Path("library")
SUFFIX = ".safetensors"
MAX_NAME_LENGTH = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(text: str) -> str:
    """A tuner name that is a plain file stem: letters, digits, '.', '_' and '-' only, no leading dot.

    Other characters (spaces, slashes, '..') become '_'; a trailing '.safetensors' is dropped.
    """
    name = str(text).strip()
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    name = _UNSAFE.sub("_", name).strip("._-")[:MAX_NAME_LENGTH].rstrip("._-")
    if not name:
        raise UserInputError(f"{text!r} is not a usable tuner name: use letters, digits, '-', '_' or '.'")
    return name


@dataclass(frozen=True)
class TunerEntry:
    """One tuner file as the library lists it; `error` explains a file that cannot be read."""

    name: str
    path: Path
    shipped: bool
    size_bytes: int
    num_parameters: int = 0
    metadata: TunerMetadata | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return self.metadata.kind if self.metadata else "?"

    def fits(self, layout: SkipLayout) -> bool:
        """True when the tuner was made for a UNet with exactly these skips."""
        if self.metadata is None:
            return False
        return (self.metadata.skip_channels, self.metadata.skip_downsample) == (layout.channels, layout.is_downsample)


class TunerLibrary:
    def __init__(self, root: str | Path = DEFAULT_LIBRARY, shipped: Path = SHIPPED_TUNERS) -> None:
        self.root = Path(root)
        self.shipped = shipped

    def folders(self) -> list[Path]:
        return [self.root, self.shipped]

    def resolve(self, name_or_path: str) -> Path:
        """A tuner by file path, or by name (with or without `.safetensors`) in the library folders."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        file_name = path.name if path.suffix == SUFFIX else f"{path.name}{SUFFIX}"
        if path.name == name_or_path:
            for folder in self.folders():
                if (folder / file_name).is_file():
                    return folder / file_name
        raise UserInputError(
            f"tuner {name_or_path!r} not found: not a file, and not in {' or '.join(str(f) for f in self.folders())}"
        )

    def names(self) -> list[str]:
        return sorted(self._files())

    def _files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in reversed(self.folders()):  # the user's library shadows shipped tuners
            for path in sorted(folder.glob(f"*{SUFFIX}")):
                found[path.stem] = path
        return found

    # -- listing -----------------------------------------------------------------------------------
    def entries(self) -> list[TunerEntry]:
        """Every tuner by name, with its metadata; unreadable files are listed with the reason."""
        return [self._entry(name, path) for name, path in sorted(self._files().items())]

    def entry(self, name: str) -> TunerEntry:
        return self._entry(name, self.find(name))

    def _entry(self, name: str, path: Path) -> TunerEntry:
        shipped = path.parent.resolve() != self.root.resolve()
        size = path.stat().st_size
        try:
            metadata = read_metadata(path)
            count = _parameter_count(path)
        except TunerFileError as error:
            return TunerEntry(name, path, shipped, size, error=str(error))
        return TunerEntry(name, path, shipped, size, count, metadata)

    def find(self, name: str) -> Path:
        """The file of the tuner called `name` (a name only, never a path: safe for web requests)."""
        path = self._files().get(str(name).removesuffix(SUFFIX))
        if path is None:
            raise UserInputError(f"no tuner named {name!r} in {' or '.join(str(f) for f in self.folders())}")
        return path

    def _own(self, name: str) -> Path:
        """The library file of `name`; shipped tuners cannot be changed."""
        path = self.find(name)
        if path.parent.resolve() != self.root.resolve():
            raise UserInputError(f"{name!r} is a shipped tuner and read-only; import a copy to change it")
        return path

    def path_for(self, name: str) -> Path:
        """Where a tuner called `name` (sanitised) is stored in the library folder."""
        path = self.root / f"{sanitize_name(name)}{SUFFIX}"
        if path.resolve().parent != self.root.resolve():  # defence in depth: sanitising already forbids this
            raise UserInputError(f"{name!r} would be stored outside the library folder")
        return path

    def _free_path(self, name: str) -> Path:
        path = self.path_for(name)
        if path.exists():
            raise UserInputError(f"a tuner named {path.stem!r} already exists; choose another name or delete it first")
        return path

    # -- changes (library folder only) ---------------------------------------------------------------
    def save(self, tuner: Tuner, metadata: TunerMetadata, name: str, overwrite: bool = False) -> Path:
        """Write `tuner` into the library as `name` (atomically); refuses to replace one unless `overwrite`."""
        path = self.path_for(name) if overwrite else self._free_path(name)
        save_tuner(tuner, path, metadata)
        return path

    def rename(self, old: str, new: str) -> Path:
        source = self._own(old)
        target = self._free_path(new)
        source.replace(target)
        return target

    def delete(self, name: str) -> None:
        self._own(name).unlink()

    def export(self, name: str) -> Path:
        """The file of `name`, to hand to the user as a download."""
        return self.find(name)

    def import_file(
        self,
        source: str | Path,
        name: str | None = None,
        layout: SkipLayout | None = None,
        base_architecture: str = "unknown",
        condition_type: str | None = None,
        origin: str | None = None,
    ) -> Path:
        """Copy a tuner file of this format into the library, or convert an official SCEdit checkpoint.

        `source` is a `.safetensors` tuner, an official `pytorch_model.bin` / `adapter_model.safetensors`
        (with `configuration.json` beside it), or a folder holding one (also as `0_SwiftSCETuning/`).
        Official files need the `layout` of the base they were trained for (the loaded model) to be
        converted; `origin` (a hub address) is recorded in the tuner's metadata.
        """
        source = Path(source)
        if not source.exists():
            raise UserInputError(f"{source} does not exist")
        own_format = source.is_file() and source.suffix == SUFFIX and _has_own_metadata(source)
        if own_format:
            target = self._free_path(name or source.stem)
            try:
                load_tuner(source)  # the weights must fit the file's own metadata
            except TunerFileError as error:
                raise UserInputError(str(error)) from None
            atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))
            return target
        if layout is None:
            raise UserInputError(f"{source.name} is not a tuner of this format; load a base model to convert official checkpoints")
        target = self._free_path(name or _official_name(source, condition_type))
        try:
            tuner, metadata = import_official(source, layout, base_architecture, condition_type, origin)
        except (TunerFileError, LayoutMismatchError, SafetensorError, OSError) as error:
            raise UserInputError(f"cannot import {source.name}: {error}") from None
        save_tuner(tuner, target, metadata)
        return target

    def fetch(
        self,
        subfolder: str,
        repo_id: str = OFFICIAL_REPO,
        layout: SkipLayout | None = None,
        base_architecture: str | None = None,
        name: str | None = None,
        condition_type: str | None = None,
    ) -> Path:
        """Download an official tuner (hub id + sub-folder) and import it, recording the base and the hub address.

        The base is `base_architecture` or the release's folder name (SD1.5, SD2.1, SD_XL1.0); without a
        `layout` (no model loaded) the reference layout of that base is used. Offline (HF_HUB_OFFLINE or
        TRANSFORMERS_OFFLINE), a copy already in the Hugging Face cache is used, else one message says
        what to download and where to put it.
        """
        subfolder = subfolder.strip().strip("/")
        if not subfolder or ".." in Path(subfolder).parts:
            raise UserInputError(f"{subfolder!r} is not a folder of a hub repository, e.g. controllable_model/SD2.1/canny_control")
        named_base = next((base for folder, base in HUB_BASES.items() if folder in Path(subfolder).parts), None)
        base = base_architecture if base_architecture not in (None, "", "unknown") else named_base
        if named_base and base in BASE_NAMES and base != named_base:
            raise UserInputError(
                f"{repo_id}/{subfolder} is made for {BASE_NAMES[named_base]}, but the base is {BASE_NAMES[base]}; "
                f"load {BASE_NAMES[named_base]} first"
            )
        if layout is None:
            if base not in REFERENCE_UNET_CONFIGS:
                raise UserInputError(f"say which base {repo_id}/{subfolder} is for ({', '.join(BASE_NAMES)}) or load that base model")
            layout = SkipLayout.from_config(REFERENCE_UNET_CONFIGS[base])
        origin = f"hf://{repo_id}/{subfolder}"
        try:
            snapshot = huggingface_hub.snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*"])
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
            if hub_offline():
                raise UserInputError(offline_message(repo_id, subfolder, base)) from None
            raise UserInputError(f"cannot download {origin}: {str(error).splitlines()[0]}") from None
        folder = Path(snapshot) / subfolder
        if not folder.is_dir():
            raise UserInputError(f"{repo_id} has no folder {subfolder!r}; see https://huggingface.co/{repo_id}/tree/main")
        default_name = "-".join(Path(subfolder).parts[-2:]).replace("_control", "")
        return self.import_file(folder, name or default_name, layout, base or "unknown", condition_type, origin)

    def export_official(self, name: str, folder: str | Path) -> Path:
        """Write tuner `name` as SCEPTER lays tuners out (`folder/0_SwiftSCETuning/...`), for SCEPTER Studio / ComfyUI-Scepter."""
        try:
            tuner, metadata = load_tuner(self.find(name))
        except TunerFileError as error:
            raise UserInputError(str(error)) from None
        try:
            return export_official(tuner, metadata, folder)
        except FileExistsError as error:
            raise UserInputError(str(error)) from None

    def import_files(self, files: Sequence[str | Path], **options) -> Path:
        """`import_file` for uploaded files that belong together (official weights + configuration.json)."""
        files = [Path(f) for f in files]
        if not files:
            raise UserInputError("choose a tuner file to import")
        if len(files) == 1:
            return self.import_file(files[0], **options)
        weights = [f for f in files if f.name != "configuration.json"]
        if len(weights) != 1:
            raise UserInputError(f"import one tuner at a time (plus its configuration.json), got {', '.join(f.name for f in weights)}")
        with tempfile.TemporaryDirectory() as folder:
            for file in files:
                shutil.copyfile(file, Path(folder) / file.name)
            return self.import_file(Path(folder) / weights[0].name, **options)


def offline_message(repo_id: str, subfolder: str, base: str | None) -> str:
    """What to download, and where to put it, when the hub is off."""
    base_option = f" --base {base}" if base else ""
    return (
        f"the Hugging Face Hub is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set) and {repo_id}/{subfolder} is not in its cache. "
        f"On a connected machine run: hf download {repo_id} --include '{subfolder}/*' --local-dir scepter_scedit ; "
        f"copy the folder scepter_scedit/{subfolder} here and import it: python -m scedit_ui tuners import scepter_scedit/{subfolder}{base_option} "
        "(or upload its 0_SwiftSCETuning files in the Tuners tab)"
    )


def _has_own_metadata(path: Path) -> bool:
    """True when the file carries an SCEdit metadata entry (a damaged one is then reported as such, not as "official")."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return METADATA_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False


def _official_name(source: Path, condition_type: str | None) -> str:
    stem = source.stem if source.is_file() else source.name
    if stem in {Path(f).stem for f in OFFICIAL_FILES}:
        return f"scedit-{condition_type}" if condition_type else "scedit-imported"
    return stem


def _parameter_count(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            total = 0
            for key in handle.keys():
                count = 1
                for side in handle.get_slice(key).get_shape():
                    count *= side
                total += count
            return total
    except (SafetensorError, OSError) as error:
        raise TunerFileError(f"{path.name} is not a readable safetensors file: {error}") from error
