"""What every tab shares: the one model manager, the tuner library and where outputs go."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from scedit_ui.model_manager import ASSETS, ModelManager
from scedit_ui.request import save_png
from scedit_ui.tuner_library import TunerLibrary

if TYPE_CHECKING:
    from scedit_ui.ui.train_tab import TrainingJob

DEFAULT_OUTPUTS = Path("outputs")


@dataclass
class AppState:
    manager: ModelManager
    library: TunerLibrary
    output_dir: Path = DEFAULT_OUTPUTS
    assets_dir: Path = ASSETS
    training: TrainingJob | None = None  # the latest training run (one at a time)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)

    def save_outputs(self, images: list[Image.Image], tag: str = "image") -> list[str]:
        """Write images as PNG (keeping their generation metadata) under the output folder; their paths."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for image in images:
            path = self.output_dir / f"{stamp}-{next(self._counter):04d}-{tag}.png"
            save_png(image, str(path))
            paths.append(str(path.resolve()))
        return paths

    def close(self, timeout: float = 60.0) -> None:
        """Stop a running training (within one step) and wait for it, so the process exits cleanly."""
        if self.training is not None and self.training.running:
            self.training.cancel.set()
            self.training.wait(timeout)

    def tuner_names(self, kind: str, condition: str | None = None) -> list[str]:
        """Library tuners of `kind` ("sc" | "csc") made for the loaded base (CSC: for `condition`, or of unknown type)."""
        layout = self.manager.editor.layout if self.manager.editor is not None else None
        return [
            entry.name
            for entry in self.library.entries()
            if entry.kind == kind
            and (layout is None or entry.fits(layout))
            and (condition is None or entry.metadata.condition_type in (condition, None, "unknown"))
        ]

    def default_tuner(self, condition: str) -> str | None:
        """The library CSC tuner made for `condition` (first by name) that fits the base: preselected in its condition row."""
        names = [name for name in self.tuner_names("csc", condition) if self.library.entry(name).metadata.condition_type == condition]
        return names[0] if names else None
