"""Import of official SCEdit checkpoints (as released with SCEPTER) into this project's tuner format.

Official SC files index `lsc_identity.{i}` in decoder order (i = K−1−g); CSC files use
`pre_hint_blocks.*`, `dense_hint_blocks.{g}.*`, `lsc_tuner_blocks.{g}.tuner_op.ln1/ln2.*` in encoder
order. Keys may carry `model.` / `0.` prefixes. This is the only place a pickle (`pytorch_model.bin`)
is read, and only with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tuners.csc_tuner import CSCTuner
from tuners.io import Tuner, TunerFileError, TunerMetadata, load_exactly
from tuners.layout import SkipLayout
from tuners.sc_tuner import SCTuner

OFFICIAL_FILES = ("adapter_model.safetensors", "pytorch_model.bin")
_ROOTS = ("lsc_identity", "pre_hint_blocks", "dense_hint_blocks", "lsc_tuner_blocks")
_ROOT_PATTERN = re.compile(r"(?:^|\.)(" + "|".join(_ROOTS) + r")\.")
_SC_KEY = re.compile(r"^lsc_identity\.(\d+)\.(?:.*\.)?(ln[12]\.(?:weight|bias))$")


def read_official_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights (prefixes stripped) and `configuration.json` (or {}) from an official file or folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in OFFICIAL_FILES if (path / name).is_file()]
        if not found:
            raise TunerFileError(f"{path} holds none of {', '.join(OFFICIAL_FILES)}")
        weights_file = found[0]
    else:
        weights_file = path
    config_file = weights_file.parent / "configuration.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TunerFileError(f"configuration.json beside {weights_file.name} is not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise TunerFileError(f"configuration.json beside {weights_file.name} must hold a JSON object")

    if weights_file.suffix == ".safetensors":
        try:
            raw = load_file(str(weights_file))
        except (SafetensorError, OSError) as error:
            raise TunerFileError(f"{weights_file.name} is not a readable safetensors file: {error}") from error
    else:
        try:
            raw = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for non-weights pickles; all mean "refused"
            raise TunerFileError(f"{weights_file.name} is not a weights-only PyTorch checkpoint ({_refusal_reason(error)}); "
                                 "it was not unpickled") from error
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise TunerFileError(f"{weights_file.name} does not hold a state dict")

    state = {}
    for key, tensor in raw.items():
        match = _ROOT_PATTERN.search(key)
        if match and isinstance(tensor, torch.Tensor):
            state[key[match.start(1):]] = tensor
    if not state:
        raise TunerFileError(f"{weights_file.name} holds no SCEdit tuner keys ({', '.join(_ROOTS)})")
    return state, config


def _sc_from_official(state: dict[str, torch.Tensor], layout: SkipLayout) -> SCTuner:
    by_decoder_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _SC_KEY.match(key)
        if not match:
            raise TunerFileError(f"unexpected key in an SC checkpoint: {key}")
        by_decoder_index.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    num_skips = len(by_decoder_index)
    channels = tuple(by_decoder_index[num_skips - 1 - g]["ln1.weight"].shape[1] for g in range(num_skips))
    file_layout = SkipLayout(channels, layout.is_downsample[:num_skips], ((),))
    layout.check_matches(file_layout, "official SC checkpoint")
    widest = max(range(num_skips), key=lambda g: channels[g])
    down_ratio = round(by_decoder_index[num_skips - 1 - widest]["ln1.weight"].shape[0] / channels[widest], 6)
    tuner = SCTuner(layout, down_ratio)
    converted = {
        f"adapters.{num_skips - 1 - i}.{name}": tensor for i, params in by_decoder_index.items() for name, tensor in params.items()
    }
    _load_exactly(tuner, converted)
    return tuner


def _csc_from_official(state: dict[str, torch.Tensor], layout: SkipLayout, condition_type: str) -> CSCTuner:
    dense = sorted(k for k in state if k.startswith("dense_hint_blocks.") and k.endswith(".weight"))
    if not dense:
        raise TunerFileError("CSC checkpoint has no dense_hint_blocks weights")
    kernel_size = state[dense[0]].shape[-1]
    out_channels = {int(k.split(".")[1]): state[k].shape[0] for k in dense}
    file_layout = SkipLayout(tuple(out_channels[g] for g in sorted(out_channels)), layout.is_downsample[: len(out_channels)], ((),))
    layout.check_matches(file_layout, "official CSC checkpoint")
    tuner = CSCTuner(layout, kernel_size, condition_type)
    _load_exactly(tuner, state)
    return tuner


def _load_exactly(tuner: Tuner, state: dict[str, torch.Tensor]) -> None:
    load_exactly(tuner, state, "official checkpoint does not fit the expected tuner layout")


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names what was refused, without its advice to turn the check off."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(_TORCH_ADVICE)]
    return lines[0][:200] if lines else type(error).__name__


def import_official(
    path: str | Path, layout: SkipLayout, base_architecture: str, condition_type: str | None = None
) -> tuple[Tuner, TunerMetadata]:
    """Convert an official checkpoint for a UNet with `layout` into a tuner plus metadata."""
    state, config = read_official_state_dict(path)
    if any(k.startswith("lsc_identity.") for k in state):
        tuner: Tuner = _sc_from_official(state, layout)
    else:
        condition = condition_type or config.get("condition_type") or config.get("control_type") or "unknown"
        tuner = _csc_from_official(state, layout, str(condition))
    metadata = TunerMetadata.describe(tuner, base_architecture, training={"imported_from": Path(path).name})
    return tuner, metadata
