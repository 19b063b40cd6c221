"""Where tuner files live: the user's library folder, then the tuners shipped in assets/tuners."""
from __future__ import annotations

from pathlib import Path

from scedit_ui.errors import UserInputError
from scedit_ui.model_manager import ASSETS

SHIPPED_TUNERS = ASSETS / "tuners"
DEFAULT_LIBRARY = Path("library")


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
        file_name = path.name if path.suffix == ".safetensors" else f"{path.name}.safetensors"
        if path.name == name_or_path:
            for folder in self.folders():
                if (folder / file_name).is_file():
                    return folder / file_name
        raise UserInputError(
            f"tuner {name_or_path!r} not found: not a file, and not in {' or '.join(str(f) for f in self.folders())}"
        )

    def names(self) -> list[str]:
        found: dict[str, Path] = {}
        for folder in reversed(self.folders()):  # the user's library shadows shipped tuners
            for path in sorted(folder.glob("*.safetensors")):
                found[path.stem] = path
        return sorted(found)
