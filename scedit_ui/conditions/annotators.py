"""Model-based annotators (HED, MiDaS depth, OpenPose, semantic segmentation), loaded on first use.

Nothing heavy is imported here at module level: torch, controlnet-aux and transformers are imported
when a model is first needed, so importing the app loads no annotator.

Weights are looked up, in this order:

1. the folder set with `set_annotators_dir` (the `--annotators DIR` option of the CLI and the app);
2. the folders listed in `$SCEDIT_ANNOTATORS` (separated by `os.pathsep`);
3. the Hugging Face cache;
4. the Hugging Face Hub, unless `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, with a short timeout.

A folder uses the layout of the `lllyasviel/Annotators` repository (`ControlNetHED.pth`,
`dpt_hybrid-midas-501f0c75.pt`, `body_pose_model.pth`, ...) plus one sub-folder per transformers
segmentation model (`segformer-b0-finetuned-ade-512-512/config.json` + `model.safetensors`).
A missing file raises `UserInputError` naming the file, every place looked and how to get it.

Tests (and callers with their own networks) put a ready model into the registry with
`register_annotator_model(name, model)`; `detect_*` then use it without looking for any file.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scedit_ui.hub import hub_offline
from tuners.validation import UserInputError

logger = logging.getLogger(__name__)

ANNOTATORS_ENV = "SCEDIT_ANNOTATORS"
HUB_TIMEOUT_S = 10.0
HUB_PROBE_TIMEOUT_S = 3.0

# Errors a weight file that is truncated, of the wrong model or not a checkpoint at all can raise on load.
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError)


@dataclass(frozen=True)
class AnnotatorModel:
    """One annotator network: where its files live and how to build it from them.

    `files` lists the required files; each entry gives alternatives, the first found wins.
    `folder` is the sub-folder of an annotators folder that holds them ("" = the folder itself).
    `build` receives the resolved path of each required file, in order.
    """

    name: str
    repo_id: str
    files: tuple[tuple[str, ...], ...]
    build: Callable[[list[Path]], Any]
    folder: str = ""


_annotators_dir: Path | None = None
_models: dict[str, Any] = {}
_lock = threading.RLock()


def set_annotators_dir(directory: str | Path | None) -> None:
    """Use `directory` first when looking for weights (None: only `$SCEDIT_ANNOTATORS` and the Hub).

    Models already loaded or registered are forgotten, so the next use loads from the new folder.
    """
    global _annotators_dir
    if directory is not None:
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise UserInputError(f"annotators folder {directory} does not exist or is not a folder")
    with _lock:
        _annotators_dir = directory
        _models.clear()


def annotators_dirs() -> list[Path]:
    """The annotator folders searched, in order: `set_annotators_dir`, then `$SCEDIT_ANNOTATORS`."""
    dirs = [_annotators_dir] if _annotators_dir is not None else []
    dirs += [Path(p).expanduser() for p in os.environ.get(ANNOTATORS_ENV, "").split(os.pathsep) if p]
    return dirs


def register_annotator_model(name: str, model: Any) -> None:
    """Use `model` for annotator `name` (one of `ANNOTATOR_MODELS`) instead of loading weights."""
    if name not in ANNOTATOR_MODELS:
        raise KeyError(f"unknown annotator model {name!r}; known: {', '.join(ANNOTATOR_MODELS)}")
    with _lock:
        _models[name] = model


def clear_annotator_models() -> None:
    """Forget every loaded or registered annotator model (frees their memory)."""
    with _lock:
        _models.clear()


def annotator_model(name: str) -> Any:
    """The annotator model `name`, loaded from its weights on first use."""
    with _lock:
        if name not in _models:
            spec = ANNOTATOR_MODELS[name]
            paths = resolve_weights(spec)
            logger.info("loading annotator %s from %s", name, paths[0].parent)
            try:
                model = spec.build(paths)
            except ImportError as error:
                raise UserInputError(
                    f"annotator {name!r} needs controlnet-aux and transformers, which failed to import ({error}); "
                    "install them with `pip install controlnet-aux transformers`"
                ) from error
            except _LOAD_ERRORS as error:
                raise UserInputError(
                    f"could not load annotator {name!r} from {', '.join(map(str, paths))}: {_first_line(error)}. "
                    f"The file may be incomplete or of another model; download it again from "
                    f"https://huggingface.co/{spec.repo_id}"
                ) from error
            _models[name] = _to_best_device(model)
        return _models[name]


def resolve_weights(spec: AnnotatorModel, *, download: bool = True) -> list[Path]:
    """Paths of the files of `spec`, from the annotator folders, the Hub cache or (online) the Hub."""
    looked: list[str] = []
    for directory in annotators_dirs():
        found = _find_in_folder(directory / spec.folder, spec.files)
        if found is not None:
            return found
        looked.append(str(directory / spec.folder) if spec.folder else str(directory))
    if not annotators_dirs():
        looked.append(f"no annotators folder (--annotators DIR or ${ANNOTATORS_ENV} not set)")

    from huggingface_hub import constants as hub_constants

    found = _find_in_hub_cache(spec)
    if found is not None:
        return found
    looked.append(f"Hugging Face cache {hub_constants.HF_HUB_CACHE} ({spec.repo_id})")

    if download and hub_offline():
        looked.append("Hugging Face Hub: not tried, offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
    elif download:
        found, reason = _download_from_hub(spec) if (unreachable := _hub_unreachable()) is None else (None, unreachable)
        if found is not None:
            return found
        looked.append(f"Hugging Face Hub {spec.repo_id}: {reason}")

    missing = " and ".join(" or ".join(alternatives) for alternatives in spec.files)
    target = f"DIR/{spec.folder}" if spec.folder else "DIR"
    hint = (
        f"`hf download {spec.repo_id} {' '.join(a[0] for a in spec.files)} --local-dir {target}`"
        if not spec.folder
        else f"`hf download {spec.repo_id} --local-dir {target}`"
    )
    raise UserInputError(
        f"annotator {spec.name!r} needs {missing}, not found. Looked in: {'; '.join(looked)}. "
        f"Get it with {hint} on a machine with internet, then pass --annotators DIR or set {ANNOTATORS_ENV}=DIR."
    )


def _find_in_folder(folder: Path, files: Sequence[tuple[str, ...]]) -> list[Path] | None:
    found = []
    for alternatives in files:
        path = next((folder / name for name in alternatives if (folder / name).is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


def _find_in_hub_cache(spec: AnnotatorModel) -> list[Path] | None:
    from huggingface_hub import try_to_load_from_cache

    found = []
    for alternatives in spec.files:
        cached = (try_to_load_from_cache(spec.repo_id, name) for name in alternatives)
        path = next((Path(c) for c in cached if isinstance(c, str)), None)
        if path is None:
            return None
        found.append(path)
    return found


def _download_from_hub(spec: AnnotatorModel) -> tuple[list[Path] | None, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HTTPError

    found = []
    for alternatives in spec.files:
        reason = "not in the repository"
        for name in alternatives:
            logger.info("downloading %s from %s", name, spec.repo_id)
            try:
                found.append(Path(hf_hub_download(spec.repo_id, name, etag_timeout=HUB_TIMEOUT_S)))
                break
            except EntryNotFoundError as error:
                reason = _first_line(error)
            except (OSError, HTTPError) as error:
                return None, f"download failed ({_first_line(error)})"
        else:
            return None, reason
    return found, ""


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, or None. A quick probe: the Hub client retries for ~30 s before giving up."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants as hub_constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy decides; leave it to the Hub client
    url = urlsplit(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"not reachable ({url.hostname}: {error})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _to_best_device(model: Any) -> Any:
    import torch

    if torch.cuda.is_available() and hasattr(model, "to"):
        model = model.to("cuda")
    return model


def _import_controlnet_aux() -> None:
    # controlnet-aux imports every detector on first import, and several warn about deprecated timm paths.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux  # noqa: F401


# --- building each network from its files ---------------------------------------------------------------


def _load_state_dict(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _build_hed(paths: list[Path]) -> Any:
    _import_controlnet_aux()
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    network = ControlNetHED_Apache2()
    network.load_state_dict(_load_state_dict(paths[0]))
    return HEDdetector(network.float().eval())


def _build_midas(paths: list[Path]) -> Any:
    _import_controlnet_aux()
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.api import MiDaSInference

    with warnings.catch_warnings():  # timm: "Mapping deprecated model name vit_base_resnet50_384 ..."
        warnings.simplefilter("ignore", UserWarning)
        return MidasDetector(MiDaSInference(model_type="dpt_hybrid", model_path=str(paths[0])))


def _build_openpose_part(part: str) -> Callable[[list[Path]], Any]:
    def build(paths: list[Path]) -> Any:
        _import_controlnet_aux()
        from controlnet_aux.open_pose import body, face, hand

        return {"body": body.Body, "hand": hand.Hand, "face": face.Face}[part](str(paths[0]))

    return build


def _build_segmenter(paths: list[Path]) -> Any:
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    folder = paths[0].parent
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True) if (folder / "preprocessor_config.json").is_file() else None
    return SemanticSegmenter(model.eval(), processor)


_ANNOTATORS_REPO = "lllyasviel/Annotators"
_SEG_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

ANNOTATOR_MODELS: dict[str, AnnotatorModel] = {
    spec.name: spec
    for spec in (
        AnnotatorModel("hed", _ANNOTATORS_REPO, (("ControlNetHED.pth",),), _build_hed),
        AnnotatorModel("midas", _ANNOTATORS_REPO, (("dpt_hybrid-midas-501f0c75.pt",),), _build_midas),
        AnnotatorModel("openpose_body", _ANNOTATORS_REPO, (("body_pose_model.pth",),), _build_openpose_part("body")),
        AnnotatorModel("openpose_hand", _ANNOTATORS_REPO, (("hand_pose_model.pth",),), _build_openpose_part("hand")),
        AnnotatorModel("openpose_face", _ANNOTATORS_REPO, (("facenet.pth",),), _build_openpose_part("face")),
        AnnotatorModel(
            "segformer-b0-finetuned-ade-512-512",
            "nvidia/segformer-b0-finetuned-ade-512-512",
            (("config.json",), _SEG_WEIGHTS),
            _build_segmenter,
            folder="segformer-b0-finetuned-ade-512-512",
        ),
        AnnotatorModel(
            "upernet-convnext-small",
            "openmmlab/upernet-convnext-small",
            (("config.json",), _SEG_WEIGHTS),
            _build_segmenter,
            folder="upernet-convnext-small",
        ),
    )
}
SEGMENTATION_MODELS = ("segformer-b0-finetuned-ade-512-512", "upernet-convnext-small")


# --- segmentation -----------------------------------------------------------------------------------------


class SemanticSegmenter:
    """A transformers semantic-segmentation model whose label map is drawn with the ADE20K palette.

    ControlNet's segmentation conditions use the same palette, so its seg maps are interchangeable.
    Pre- and post-processing are the model's own transformers image processor.
    """

    def __init__(self, model: Any, processor: Any = None):
        from transformers import SegformerImageProcessor

        self.model = model
        # The ADE20K segmenters offered (SegFormer, UperNet) ship this processor: ImageNet mean and std, no crop.
        self.processor = processor if processor is not None else SegformerImageProcessor()

    def to(self, device: Any) -> SemanticSegmenter:
        self.model.to(device)
        return self

    def __call__(self, image: np.ndarray, detect_resolution: int = 512) -> np.ndarray:
        """RGB uint8 HxWx3 in, palette colour map of the same size out."""
        import torch

        height, width = image.shape[:2]
        scale = detect_resolution / min(height, width)
        # Multiples of 32 suit every backbone's down-sampling (ConvNeXt, MiT).
        detect_w, detect_h = (max(32, int(round(side * scale / 32)) * 32) for side in (width, height))
        inputs = self.processor(images=image, size={"height": detect_h, "width": detect_w}, return_tensors="pt")
        parameter = next(self.model.parameters())
        with torch.no_grad():
            outputs = self.model(pixel_values=inputs.pixel_values.to(parameter.device, parameter.dtype))
        outputs.logits = outputs.logits.float()
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[(height, width)])[0]
        return ade_palette(self.model.config.num_labels)[labels.cpu().numpy()]


def ade_palette(num_labels: int = 150) -> np.ndarray:
    """(num_labels, 3) uint8 colours: the ADE20K palette of ControlNet, extended by fixed colours if needed."""
    _import_controlnet_aux()
    from controlnet_aux.util import ade_palette as controlnet_palette

    palette = np.asarray(controlnet_palette(), dtype=np.uint8)
    if num_labels > len(palette):
        extra = np.random.default_rng(0).integers(0, 256, size=(num_labels - len(palette), 3), dtype=np.uint8)
        palette = np.concatenate([palette, extra])
    return palette[:num_labels]


# --- detection: RGB uint8 HxWx3 in, RGB uint8 condition map out (any size; the caller resizes) ------------------


def detect_hed(image: np.ndarray, *, detect_resolution: int, safe: bool, scribble: bool) -> np.ndarray:
    detector = annotator_model("hed")
    return detector(image, detect_resolution=detect_resolution, image_resolution=detect_resolution, safe=safe, scribble=scribble, output_type="np")


def detect_depth(image: np.ndarray, *, detect_resolution: int) -> np.ndarray:
    detector = annotator_model("midas")
    return detector(image, detect_resolution=detect_resolution, image_resolution=detect_resolution, output_type="np")


def detect_pose(image: np.ndarray, *, detect_resolution: int, include_hand: bool, include_face: bool) -> np.ndarray:
    _import_controlnet_aux()
    from controlnet_aux.open_pose import OpenposeDetector

    detector = OpenposeDetector(
        annotator_model("openpose_body"),
        annotator_model("openpose_hand") if include_hand else None,
        annotator_model("openpose_face") if include_face else None,
    )
    return detector(
        image,
        detect_resolution=detect_resolution,
        image_resolution=detect_resolution,
        include_hand=include_hand,
        include_face=include_face,
        output_type="np",
    )


def detect_segmentation(image: np.ndarray, *, detect_resolution: int, model: str) -> np.ndarray:
    return annotator_model(model)(image, detect_resolution=detect_resolution)
