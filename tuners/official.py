"""Official SCEdit checkpoints (SCEPTER, ms-swift) into this project's tuner format and back.

What the reference code writes (scepter/modules/model/tuner/sce/scetuning.py, ldm_sce.py,
swift/tuners/scetuning/scetuning.py):

- CSC controllers: `0_SwiftSCETuning/pytorch_model.bin` + `configuration.json` ({"CONTROL_MODEL": {...}}),
  keys `0.pre_hint_blocks.{i}.*`, `0.dense_hint_blocks.{g}.1.*` (encoder order g) and
  `0.lsc_tuner_blocks.{m}.tuner_op.ln1/ln2.*` in **decoder order** m = K−1−g.
- SC tuners: `model.lsc_identity.{m}.tuner_op.*` (SCEPTER) or, saved by swift,
  `model.lsc_identity.{m}.scetuner_<adapter>.tuner_op.*` (identity mode; decoder order m) and
  `unet.up_blocks.{b}.resnets.{r}.scetuner_<adapter>.tuner_op.*` (diffusers decoder mode, acting on the
  skip part of the resnet's concatenated input), in `adapter_model.safetensors` / `.bin` beside `adapter_config.json`.

Keys may carry `model.` / `0.` / `unet.` prefixes. This is the only place a pickle is read, and only with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuners.csc_tuner import CSCTuner, CSCTunerConfig, hint_widths
from tuners.io import Tuner, TunerFileError, TunerMetadata, load_exactly
from tuners.layout import LayoutMismatchError, SkipLayout, SkipShape
from tuners.reference_configs import REFERENCE_UNET_CONFIGS
from tuners.sc_tuner import SCTuner, mid_width
from tuners.validation import UserInputError

ADAPTER_FOLDER = "0_SwiftSCETuning"  # the sub-folder SCEPTER reads (swift's adapter name)
OFFICIAL_FILES = ("pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILES = ("configuration.json", "adapter_config.json")
STUDIO_FILE = "scedit_studio.json"  # this project's metadata beside an export; SCEPTER ignores it
_CONDITION_WORDS = ("canny", "depth", "hed", "pose", "color", "colour", "seg", "scribble", "lineart", "inpaint")

_SC_IDENTITY = re.compile(r"^(?P<prefix>.*?)lsc_identity\.(?P<m>\d+)\.(?:scetuner_(?P<adapter>[^.]+)\.)?(?:tuner_op\.)?(?P<param>ln[12]\.(?:weight|bias))$")
_SC_DECODER = re.compile(r"^(?P<prefix>.*?)up_blocks\.(?P<b>\d+)\.resnets\.(?P<r>\d+)\.scetuner_(?P<adapter>[^.]+)\.tuner_op\.(?P<param>ln[12]\.(?:weight|bias))$")
_CSC = re.compile(r"^(?P<prefix>.*?)(?P<name>(?:pre_hint_blocks|dense_hint_blocks|lsc_tuner_blocks)\..+)$")
_LSC_BLOCK = re.compile(r"^lsc_tuner_blocks\.(\d+)\.(.+)$")


@dataclass
class OfficialCheckpoint:
    """An official checkpoint as read from disk: raw weights, its configuration, our metadata if we wrote it."""

    weights_file: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any]  # configuration.json (CONTROL_MODEL unwrapped) merged with adapter_config.json
    studio: TunerMetadata | None


def _weights_file(path: Path) -> Path:
    """The weights file of `path`: the file itself, or the one in the folder or its `0_SwiftSCETuning/`."""
    if path.is_file():
        return path
    for folder in (path, path / ADAPTER_FOLDER):
        for name in OFFICIAL_FILES:
            if (folder / name).is_file():
                return folder / name
    subfolders = [p for p in path.iterdir() if p.is_dir() and any((p / n).is_file() for n in OFFICIAL_FILES)] if path.is_dir() else []
    if len(subfolders) == 1:
        return _weights_file(subfolders[0])
    raise TunerFileError(f"{path} holds none of {', '.join(OFFICIAL_FILES)} (nor a {ADAPTER_FOLDER}/ folder with one)")


def _read_json(path: Path, weights_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TunerFileError(f"{path.name} beside {weights_file.name} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise TunerFileError(f"{path.name} beside {weights_file.name} must hold a JSON object")
    return data


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names what was refused, without its advice to turn the check off."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(_TORCH_ADVICE)]
    return lines[0][:200] if lines else type(error).__name__


def _load_weights(weights_file: Path) -> dict[str, Any]:
    if weights_file.suffix == ".safetensors":
        try:
            return load_file(str(weights_file))
        except (SafetensorError, OSError) as error:
            raise TunerFileError(f"{weights_file.name} is not a readable safetensors file (damaged or incomplete?): {error}") from error
    try:
        raw = torch.load(weights_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TunerFileError(f"{weights_file.name} is not a weights-only PyTorch checkpoint ({_refusal_reason(error)}); "
                             "it was not unpickled") from error
    except Exception as error:  # torch raises many types for damaged archives; all mean "unreadable"
        raise TunerFileError(f"{weights_file.name} is not a weights-only PyTorch checkpoint or is incomplete "
                             f"({_refusal_reason(error)}); it was not unpickled") from error
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise TunerFileError(f"{weights_file.name} does not hold a state dict")
    return raw


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Weights, configuration and (for our own exports) metadata of an official checkpoint file or folder."""
    weights_file = _weights_file(Path(path))
    config: dict[str, Any] = {}
    studio = None
    folders = [weights_file.parent]
    if weights_file.parent.name.endswith("SwiftSCETuning"):  # an export or swift folder: its root has more
        folders.insert(0, weights_file.parent.parent)  # the weights' own folder wins
    for folder in folders:
        for name in CONFIG_FILES:
            if (folder / name).is_file():
                data = _read_json(folder / name, weights_file)
                inner = data.get("CONTROL_MODEL")  # SCEPTER's controller configuration wraps the tuner's
                config.update(inner if isinstance(inner, dict) else data)
        if studio is None and (folder / STUDIO_FILE).is_file():
            try:
                studio = TunerMetadata.from_json((folder / STUDIO_FILE).read_text(encoding="utf-8"))
            except (TunerFileError, ValueError, OSError) as error:
                raise TunerFileError(f"{STUDIO_FILE} beside {weights_file.name} is unreadable: {error}") from error
    state = _load_weights(weights_file)
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise TunerFileError(f"{weights_file.name} holds {len(not_tensors)} entries that are not tensors (first: {not_tensors[0]}); expected tuner weights only")
    return OfficialCheckpoint(weights_file, state, config, studio)


# -- import ------------------------------------------------------------------------------------------


def _single(values: set[str], what: str, file: str) -> str:
    if len(values) > 1:
        raise TunerFileError(f"{file} holds several {what} ({', '.join(sorted(values))}); import one tuner at a time")
    return next(iter(values))


def _refuse_unknown(unknown: list[str], file: str, expected: str) -> None:
    if unknown:
        raise TunerFileError(f"{file} has {len(unknown)} keys that are not part of an SCEdit {expected} (first: {unknown[0]})")


def _guess_base(channels: tuple[int, ...]) -> str:
    names = [name for name, config in REFERENCE_UNET_CONFIGS.items() if SkipLayout.from_config(config).channels == channels]
    return " or ".join({"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}[n] for n in names)


def _check_channels(file: str, channels: tuple[int, ...], shape: SkipShape) -> None:
    if channels != tuple(shape.channels):
        base = _guess_base(channels)
        hint = f" It looks like a checkpoint for {base}: load that base model first." if base else ""
        raise LayoutMismatchError(
            f"{file} was made for a UNet with {len(channels)} skips of channels {list(channels)}, but this UNet has "
            f"{shape.num_skips} skips of channels {list(shape.channels)}.{hint}"
        )


def _down_ratio(file: str, channels: tuple[int, ...], widths: tuple[int, ...], given: Any) -> float:
    """The ratio that reproduces every adapter width (int(C · r)); the configuration's value when it has one."""
    candidates = [given] if isinstance(given, (int, float)) and not isinstance(given, bool) else []
    candidates += [round(w / c, 6) for c, w in sorted(zip(channels, widths), reverse=True)]
    for ratio in candidates:
        if 0 < ratio <= 4 and all(mid_width(c, ratio) == w for c, w in zip(channels, widths)):
            return float(ratio)
    raise TunerFileError(f"{file}: adapter widths {list(widths)} for channels {list(channels)} do not follow one down ratio")


_ADAPTER_PARAMS = {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}


def _by_index(file: str, params: dict[int, dict[str, torch.Tensor]], count: int, what: str) -> list[dict[str, torch.Tensor]]:
    """`params` as a list over 0..count-1; refuse a file where an index or one of ln1/ln2 weight/bias is missing."""
    for index in range(count):
        if set(params.get(index, {})) != _ADAPTER_PARAMS:
            raise TunerFileError(f"{file} is incomplete: {what} {index} lacks some of {', '.join(sorted(_ADAPTER_PARAMS))}")
    return [params[index] for index in range(count)]


def _sc_from_official(checkpoint: OfficialCheckpoint, layout: SkipLayout) -> SCTuner:
    file = checkpoint.weights_file.name
    decoder_mode = any(_SC_DECODER.match(key) for key in checkpoint.state)
    pattern = _SC_DECODER if decoder_mode else _SC_IDENTITY
    matches = {key: pattern.match(key) for key in checkpoint.state}
    _refuse_unknown([key for key, match in matches.items() if not match], file, "SC tuner")
    _single({match["prefix"] for match in matches.values()}, "key prefixes", file)
    _single({match["adapter"] or "" for match in matches.values()}, "swift adapters", file)
    if checkpoint.config.get("tuner_mode") == "encoder":
        raise TunerFileError(f"{file} is a swift SCEdit tuner in encoder mode, which changes the encoder too; only skip edits can be imported")

    params: dict[int, dict[str, torch.Tensor]] = {}
    if decoder_mode:  # resnet r of up block b takes the r-th skip from the end of that block's tuple
        for key, match in matches.items():
            b, r = int(match["b"]), int(match["r"])
            if b >= len(layout.up_block_skips) or r >= len(layout.up_block_skips[b]):
                raise LayoutMismatchError(f"{file} edits up_blocks.{b}.resnets.{r}, which this UNet does not have")
            params.setdefault(layout.up_block_skips[b][-1 - r], {})[match["param"]] = checkpoint.state[key]
        by_skip = _by_index(file, params, layout.num_skips, "skip")
        _check_channels(file, tuple(p["ln1.weight"].shape[1] for p in by_skip), layout)
    else:  # lsc_identity.{m} is in decoder order: m = K-1-g
        for key, match in matches.items():
            params.setdefault(int(match["m"]), {})[match["param"]] = checkpoint.state[key]
        by_decoder_index = _by_index(file, params, max(params, default=-1) + 1, "lsc_identity")
        _check_channels(file, tuple(p["ln1.weight"].shape[1] for p in reversed(by_decoder_index)), layout)
        by_skip = list(reversed(by_decoder_index))

    sc_config = checkpoint.config.get("SC_TUNER_CFG")
    given = checkpoint.config.get("down_ratio", sc_config.get("DOWN_RATIO") if isinstance(sc_config, dict) else None)
    widths = tuple(p["ln1.weight"].shape[0] for p in by_skip)
    tuner = SCTuner(layout, _down_ratio(file, layout.channels, widths, given))
    converted = {f"adapters.{g}.{param}": tensor for g, p in enumerate(by_skip) for param, tensor in p.items()}
    load_exactly(tuner, converted, f"{file} does not fit an SC tuner for this UNet")
    return tuner


def _number(config: dict[str, Any], key: str) -> float | None:
    value = config.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _hint_dim_ratio(file: str, state: dict[str, torch.Tensor], out_channels: int, given: float | None) -> float:
    """The PRE_HINT_DIM_RATIO that reproduces the hint encoder's widths (the configuration's when it has one)."""
    widths = tuple(state[f"pre_hint_blocks.{2 * i}.weight"].shape[0] for i in range(7))
    candidates = ([given] if given is not None else []) + [widths[0] / 16, widths[2] / 32, widths[4] / 96]
    for ratio in candidates:
        if ratio > 0 and hint_widths(out_channels, ratio) == widths:
            return float(ratio)
    raise TunerFileError(f"{file}: hint encoder widths {list(widths)} do not follow PRE_HINT_DIM_RATIO (16·r, 16·r, 32·r, …)")


def _condition_type(checkpoint: OfficialCheckpoint) -> str:
    """The condition a controller was trained for: our metadata, the configuration, or a folder name like canny_control."""
    if checkpoint.studio is not None and checkpoint.studio.condition_type:
        return checkpoint.studio.condition_type
    for key in ("condition_type", "CONTROL_TYPE"):
        if isinstance(checkpoint.config.get(key), str):
            return checkpoint.config[key]
    for part in checkpoint.weights_file.parts[-3:-1]:  # its folder and the one above (canny_control/0_SwiftSCETuning)
        for word in _CONDITION_WORDS:
            if word in part.lower():
                return word
    return "unknown"


def _csc_from_official(checkpoint: OfficialCheckpoint, layout: SkipLayout, condition_type: str | None) -> CSCTuner:
    file, config = checkpoint.weights_file.name, checkpoint.config
    matches = {key: _CSC.match(key) for key in checkpoint.state}
    _refuse_unknown([key for key, match in matches.items() if not match], file, "CSC tuner")
    _single({match["prefix"] for match in matches.values()}, "controllers (key prefixes)", file)
    state = {match["name"]: checkpoint.state[key] for key, match in matches.items()}
    dense = {int(k.split(".")[1]): t for k, t in state.items() if re.fullmatch(r"dense_hint_blocks\.\d+\.1\.weight", k)}
    if not dense or set(dense) != set(range(len(dense))) or any(f"pre_hint_blocks.{2 * i}.weight" not in state for i in range(7)):
        raise TunerFileError(f"{file} is incomplete: it lacks part of the hint encoder (pre_hint_blocks.0-12) or of the dense convs")
    _check_channels(file, tuple(dense[g].shape[0] for g in range(len(dense))), layout)
    flags = config.get("INPUT_DOWN_FLAG")
    if isinstance(flags, list) and tuple(bool(f) for f in flags) != tuple(layout.is_downsample):
        raise LayoutMismatchError(f"{file} was made for downsample outputs at skips {[g for g, f in enumerate(flags) if f]}, "
                                  f"but this UNet has them at {[g for g, f in enumerate(layout.is_downsample) if f]}")

    hint_channels = state["pre_hint_blocks.12.weight"].shape[0]
    lsc = {int(m.group(1)): t for k, t in state.items() if (m := re.fullmatch(r"lsc_tuner_blocks\.(\d+)\.tuner_op\.ln1\.weight", k))}
    if set(lsc) != set(range(layout.num_skips)):
        raise TunerFileError(f"{file} is incomplete: it has per-skip tuner ops for {len(lsc)} of {layout.num_skips} skips")
    widths = tuple(lsc[layout.num_skips - 1 - g].shape[0] for g in range(layout.num_skips))
    csc_config = CSCTunerConfig(
        layout,
        kernel_size=dense[0].shape[-1],
        condition_type=condition_type or _condition_type(checkpoint),
        hint_in_channels=state["pre_hint_blocks.0.weight"].shape[1],
        hint_channels=hint_channels,
        hint_dim_ratio=_hint_dim_ratio(file, state, hint_channels, _number(config, "PRE_HINT_DIM_RATIO")),
        down_ratio=_down_ratio(file, layout.channels, widths, _number(config, "DOWN_RATIO")),
        scale=float(_number(config, "SCALE") or 1.0),
    )
    tuner = CSCTuner.from_config(csc_config)
    k = layout.num_skips
    converted = {}
    for name, tensor in state.items():
        block = _LSC_BLOCK.match(name)  # lsc_tuner_blocks.{m} is in decoder order: m = K-1-g
        converted[f"lsc_tuner_blocks.{k - 1 - int(block.group(1))}.{block.group(2)}" if block else name] = tensor
    load_exactly(tuner, converted, f"{file} does not fit an official CSC tuner for this UNet")
    return tuner


def import_official(
    path: str | Path, layout: SkipLayout, base_architecture: str, condition_type: str | None = None, origin: str | None = None
) -> tuple[Tuner, TunerMetadata]:
    """Convert an official checkpoint (file or folder) for a UNet with `layout` into a tuner plus metadata.

    `origin` (e.g. a hub address) is recorded as where it came from, else the file name. Raises
    `TunerFileError` or `LayoutMismatchError` naming the file and what was expected.
    """
    checkpoint = read_official(path)
    made_for = checkpoint.studio.base_architecture if checkpoint.studio else None
    if made_for in REFERENCE_UNET_CONFIGS and base_architecture in REFERENCE_UNET_CONFIGS and made_for != base_architecture:
        # SD 1.5 and SD 2.1 have the same skips: only the recorded base tells their tuners apart.
        raise LayoutMismatchError(f"{checkpoint.weights_file.name} was exported for {made_for}, but the base is {base_architecture}; load {made_for} first")
    keys = list(checkpoint.state)
    if any(_SC_IDENTITY.match(k) or _SC_DECODER.match(k) for k in keys):
        tuner: Tuner = _sc_from_official(checkpoint, layout)
    elif any(_CSC.match(k) for k in keys):
        tuner = _csc_from_official(checkpoint, layout, condition_type)
    else:
        raise TunerFileError(
            f"{checkpoint.weights_file.name} holds no SCEdit tuner keys (lsc_identity, pre_hint_blocks, dense_hint_blocks, "
            "lsc_tuner_blocks, up_blocks.*.scetuner_*)"
        )
    studio = checkpoint.studio
    extra = {"trigger_word": studio.trigger_word, "training": studio.training} if studio else {
        "training": {"imported_from": origin or checkpoint.weights_file.name}
    }
    return tuner, TunerMetadata.describe(tuner, base_architecture, **extra)


# -- export ------------------------------------------------------------------------------------------


def official_state_dict(tuner: Tuner) -> dict[str, torch.Tensor]:
    """The tuner's weights under the keys, and in the order, SCEPTER writes them (lsc_* in decoder order)."""
    k = tuner.shape.num_skips
    state = {name: t.detach().to("cpu").contiguous() for name, t in tuner.state_dict().items()}
    if isinstance(tuner, SCTuner):  # swift identity mode on SCEPTER's UNet (adapter name = the folder)
        return {
            f"model.lsc_identity.{m}.scetuner_{ADAPTER_FOLDER}.tuner_op.{param}": state[f"adapters.{k - 1 - m}.{param}"]
            for m in range(k) for param in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")
        }
    out = {f"0.{name}": tensor for name, tensor in state.items() if not name.startswith("lsc_tuner_blocks.")}
    for m in range(k):
        for param in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"):
            out[f"0.lsc_tuner_blocks.{m}.tuner_op.{param}"] = state[f"lsc_tuner_blocks.{k - 1 - m}.tuner_op.{param}"]
    return out


def _official_config(tuner: Tuner) -> tuple[str, dict[str, Any]]:
    """The configuration file SCEPTER (CSC) or swift (SC) reads, as (file name, content)."""
    shape = tuner.shape
    if isinstance(tuner, SCTuner):
        return "adapter_config.json", {
            "swift_type": "SCETuning", "dims": list(reversed(shape.channels)), "target_modules": r"model.lsc_identity\.\d+$",
            "hint_modules": None, "tuner_mode": "identity", "tuner_op": "SCEAdapter", "down_ratio": tuner.down_ratio,
            "model_key_mapping": None,
        }
    config = tuner.config
    return "configuration.json", {"CONTROL_MODEL": {
        "NAME": "CSCTuners",
        "PRE_HINT_IN_CHANNELS": config.hint_in_channels,
        "PRE_HINT_OUT_CHANNELS": config.hint_channels,
        "PRE_HINT_DIM_RATIO": config.hint_dim_ratio,
        "DENSE_HINT_KERNAL": config.kernel_size,
        "SCALE": config.scale,
        "DOWN_RATIO": config.down_ratio,
        "SC_TUNER_CFG": {"NAME": "SCTuner", "TUNER_NAME": "SCEAdapter", "DOWN_RATIO": config.down_ratio},
        "INPUT_BLOCK_CHANS": list(shape.channels),
        "INPUT_DOWN_FLAG": list(shape.is_downsample),
    }}


def export_official(tuner: Tuner, metadata: TunerMetadata, folder: str | Path) -> Path:
    """Write `tuner` as SCEPTER / swift lay it out: `folder/0_SwiftSCETuning/` with the configuration and
    weights (CSC: `pytorch_model.bin`, SC: `adapter_model.safetensors`), plus our metadata beside it.

    The folder is built in a temporary sibling and renamed into place: a failed export leaves nothing.
    """
    if isinstance(tuner, SCTuner) and (tuner.config.kernel_size != 1 or tuner.config.position_features or tuner.config.gated):
        # SCEPTER's and swift's SC adapter is two Linear layers on the skip's channels: nothing else loads there.
        def on(flag: bool) -> str:
            return "on" if flag else "off"

        raise UserInputError(
            f"this SC tuner's adapters are not the paper's (kernel {tuner.config.kernel_size}, position features "
            f"{on(tuner.config.position_features)}, gate {on(tuner.config.gated)}), so SCEPTER and swift cannot load them; "
            "only tuners trained with --kernel 1 --no-position-features --no-gated export to the official layout"
        )
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} already exists and is not empty; choose a new folder for the export")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        adapter = staging / ADAPTER_FOLDER
        adapter.mkdir()
        config_name, config = _official_config(tuner)
        (adapter / config_name).write_text(json.dumps(config, indent=2), encoding="utf-8")
        weights = official_state_dict(tuner)
        if isinstance(tuner, SCTuner):
            save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
            (staging / "configuration.json").write_text("{}", encoding="utf-8")  # what swift writes at the top
        else:
            torch.save(weights, adapter / "pytorch_model.bin")
        (staging / STUDIO_FILE).write_text(json.dumps(asdict(metadata), indent=2), encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder
