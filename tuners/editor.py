"""`SkipEditor`: the one object that owns every skip-connection edit of one UNet.

It registers forward pre-hooks on the up blocks and hands each a new `res_hidden_states_tuple`:

    x'_g = ρ_g · (x_g + Σ_i s_i · A_i(x_g) + Σ_m α_m · w_g^m · M_g^m · (c_g^m + T_g^m(x_g + c_g^m)))

with SC-Tuner adapters A_i at scale s_i (optionally on the conditional half of a classifier-free-guidance
batch only, so that guidance amplifies the tuner as it amplifies the prompt; or as texture guidance, below), CSC conditions m at weight α_m (Eq. 7; several combined by `tuners.composition`), optional per-skip
weights w_g^m and spatial α maps M^m resized to skip g's resolution, and Skip-Tuning ρ.
No copy of the UNet forward: detaching removes the hooks and the UNet is untouched.

Texture guidance: a tuner used with `texture=True` edits an extra copy of the prompt's half of the batch (one
UNet call, a larger batch), and the prompt's prediction becomes

    ε_c ← ε_c + (s / g) · HP(ε_c^tuned − ε_c)        HP = identity − Gaussian blur (TEXTURE_BLUR_SIGMA latent px)

so that guidance g (which multiplies ε_c − ε_u) adds exactly s · HP(change): the tuner's fine texture at strength s,
while the colours and layout (the low frequencies) stay the base model's. Styles are texture; a style tuner trained
on 30 pictures also drifts the colours towards its pictures', which this keeps out (docs/training.md).

Step ranges are fractions of the sampling steps: the sampling loop tells the editor which step it is
on (`set_step`), as diffusers' ControlNet pipelines use i / len(timesteps). Outside a sampling loop
(training, a bare UNet call) no step is set and every range is active.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuners.composition import DEFAULT_ALPHA_MODE, composed_alphas, composed_step_ranges
from tuners.csc_tuner import HINT_DOWNSAMPLE, ConditionFeatures, CSCTuner, interpolate_features
from tuners.layout import SkipLayout
from tuners.sc_tuner import SCTuner
from tuners.skip_scaling import SkipScaling
from tuners.validation import WEIGHT_RANGE, check_number, check_per_skip, check_step_range

logger = logging.getLogger(__name__)


# Latent pixels: 6 image px on the built-in ×4 model; blurs away a stripe period of 4 latent px to 6 % while a
# shape's colour (5-9 latent px across) stays the base's. 1.5 and 2.5 measured the same (docs/training.md).
TEXTURE_BLUR_SIGMA = 1.5


@dataclass(frozen=True)
class _SCUse:
    tuner: SCTuner
    scale: float
    conditional_only: bool
    texture: bool


@dataclass
class ControlCondition:
    """One condition for a CSC-Tuner: an image (B or 1, 3, 8·h, 8·w) in [0, 1] and how to apply it.

    `blend_image` with `blend` in [0, 1] interpolates the condition features towards a second image.
    `step_range` is the fraction of the sampling steps (0 = first step, 1 = after the last) during
    which it is active. `mask` (H, W) or (1, 1, H, W) in [0, 1] is a spatial α map over the image,
    resized to each skip's resolution; `skip_weights` (one per skip, encoder order g) scale α per skip.
    """

    tuner: CSCTuner
    image: torch.Tensor
    alpha: float = 1.0
    step_range: tuple[float, float] = (0.0, 1.0)
    blend_image: torch.Tensor | None = None
    blend: float = 0.0
    mask: torch.Tensor | None = None
    skip_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, *WEIGHT_RANGE)
        self.step_range = check_step_range("step range", self.step_range)
        check_number("blend", self.blend, 0.0, 1.0)
        if self.mask is not None:
            if self.mask.ndim == 2:
                self.mask = self.mask[None, None]
            if self.mask.ndim != 4 or self.mask.shape[:2] != (1, 1):
                raise ValueError(f"mask must be (height, width) or (1, 1, height, width), got {tuple(self.mask.shape)}")
            if not bool(((self.mask >= 0) & (self.mask <= 1)).all()):
                raise ValueError("mask values must lie in [0, 1]")
        if self.skip_weights is not None:
            self.skip_weights = check_per_skip("per-skip α", self.skip_weights, None, *WEIGHT_RANGE)

    def skip_weight(self, g: int) -> float:
        return 1.0 if self.skip_weights is None else self.skip_weights[g]


def tensor_digest(image: torch.Tensor) -> str:
    data = image.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


def _parameter_version(module: nn.Module) -> int:
    # In-place updates (optimizer steps) bump tensor versions, so cached features go stale with them.
    return sum(p._version for p in module.parameters())


class FeatureCache:
    """The most recent condition features, keyed by (tuner, its weights' version, condition image).

    The hint encoder and dense convs depend only on the condition image, so a generation computes
    them once and reuses them for every denoising step and both classifier-free-guidance halves, and
    the next generations with the same condition (a grid, a re-roll) reuse them too.
    """

    def __init__(self, maxsize: int = 6) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[int, int, str], tuple[CSCTuner, ConditionFeatures]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, tuner: CSCTuner, digest: str, compute: Callable[[], ConditionFeatures]) -> ConditionFeatures:
        """`tuner`'s features of the condition image named by `digest`; `compute()` makes them on a miss."""
        key = (id(tuner), _parameter_version(tuner), digest)
        entry = self._entries.get(key)
        if entry is None:
            # The entry keeps the tuner alive, so its id cannot be reused by another object.
            entry = (tuner, compute())
            self._entries[key] = entry
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


def _broadcast(features: torch.Tensor, batch: int) -> torch.Tensor:
    if features.shape[0] == batch:
        return features
    if batch % features.shape[0]:
        raise ValueError(f"condition batch {features.shape[0]} does not divide the UNet batch {batch}")
    # diffusers stacks CFG halves as [uncond; cond], each in prompt order, so tiling matches both.
    return features.repeat(batch // features.shape[0], *([1] * (features.ndim - 1)))


@dataclass
class _ActiveCondition:
    condition: ControlCondition
    weight: float
    features: ConditionFeatures
    masks: dict[tuple[int, int], torch.Tensor]  # the α map at each skip resolution, made on first use

    def mask_at(self, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        mask = self.condition.mask
        if mask is None:
            return None
        if size not in self.masks:
            # Area averaging keeps a soft edge's mean weight at every coarser skip.
            self.masks[size] = F.interpolate(mask.to(like.device, torch.float32), size=size, mode="area").to(like.dtype)
        return self.masks[size]


def high_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """`x` (B, C, H, W) less its separable Gaussian blur: the detail finer than about `sigma` pixels."""
    radius = max(1, round(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    blurred = F.pad(x, (radius,) * 4, mode="replicate")  # replicate: any latent size, no dark border
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x - blurred


def step_is_active(step_range: tuple[float, float], step: int, total: int) -> bool:
    """Whether step `step` of `total` lies in `step_range` (fractions of the steps), as diffusers'
    ControlNet pipelines decide it: active unless i/n < start or (i+1)/n > end."""
    start, end = step_range
    return not (step / total < start or (step + 1) / total > end)


class SkipEditor:
    """Attach SC tuners, CSC conditions and Skip-Tuning to one UNet through up-block pre-hooks.

    Attach before `torch.compile`: hooks registered after compiling are ignored.
    """

    def __init__(self, unet: nn.Module, pixels_per_latent: int = HINT_DOWNSAMPLE) -> None:
        """`pixels_per_latent` is the VAE's scale factor: condition images come at the picture's size."""
        self.unet = unet
        self.pixels_per_latent = pixels_per_latent
        self.layout = SkipLayout.from_unet(unet)
        self.cache = FeatureCache()
        self.sc_tuners: dict[str, _SCUse] = {}
        self.conditions: list[ControlCondition] = []
        self._applied_alphas: list[float] = []  # the conditions' α and step ranges as combined (set_conditions)
        self._applied_step_ranges: list[tuple[float, float]] = []
        self.skip_scaling: SkipScaling | None = None
        self.training = False
        self.step: tuple[int, int] | None = None  # (index, number of sampling steps) while sampling
        # Set by the sampling loop: the UNet batch is [unconditional; conditional] (diffusers' CFG order), and the
        # guidance scale g that the pipeline applies to them (texture guidance divides by it).
        self.guidance_halves = False
        self.guidance_scale = 1.0
        self._digests: dict[int, str] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._call_state: dict[str, Any] = {}

    # -- what to apply --------------------------------------------------------------------------
    def add_sc_tuner(self, name: str, tuner: SCTuner, scale: float = 1.0, conditional_only: bool = False, texture: bool = False) -> None:
        """Add `tuner` at `scale`; with `conditional_only` it edits only the conditional half of a guided batch
        (`guidance_halves`), so guidance g turns its effect s into about g·s, the way it amplifies the prompt;
        with `texture` it adds only the fine texture of its change, s times (texture guidance, module docstring)."""
        if conditional_only and texture:
            raise ValueError(f"SC tuner '{name}': choose style guidance (conditional_only) or texture guidance, not both")
        self.layout.check_matches(tuner.shape, f"SC tuner '{name}'")
        self.sc_tuners[name] = _SCUse(tuner.to(self._device()), scale, conditional_only, texture)

    def remove_sc_tuner(self, name: str) -> None:
        self.sc_tuners.pop(name, None)

    def set_conditions(self, conditions: Sequence[ControlCondition], alpha_mode: str = DEFAULT_ALPHA_MODE) -> None:
        """Replace the CSC conditions, combined by `alpha_mode` (their α: `composed_alphas`; their step ranges:
        `composed_step_ranges`)."""
        for condition in conditions:
            self.layout.check_matches(condition.tuner.shape, f"CSC tuner '{condition.tuner.condition_type}'")
            if condition.skip_weights is not None and len(condition.skip_weights) != self.layout.num_skips:
                raise ValueError(
                    f"per-skip weights of CSC tuner '{condition.tuner.condition_type}' need {self.layout.num_skips} values "
                    f"for this UNet, got {len(condition.skip_weights)}"
                )
            condition.tuner.to(self._device())
        alphas = [c.alpha for c in conditions]
        # Combined over every condition, not only those in their step range, so an α does not jump mid-sampling.
        self._applied_alphas = composed_alphas(alphas, alpha_mode)  # refuses a bad mode or a sum it cannot normalise
        self._applied_step_ranges = composed_step_ranges([c.tuner.condition_type for c in conditions], alphas,
                                                         [c.step_range for c in conditions], alpha_mode)
        self.conditions = list(conditions)
        self._digests = {}  # filled on first use: training never reads the feature cache, so never hashes

    @property
    def applied_alphas(self) -> list[float]:
        """The α each condition is applied with, as its α mode combines them (`composed_alphas`)."""
        return list(self._applied_alphas)

    @property
    def applied_step_ranges(self) -> list[tuple[float, float]]:
        """The step range each condition is applied over, as its α mode combines them (`composed_step_ranges`)."""
        return list(self._applied_step_ranges)

    def set_skip_scaling(self, scaling: SkipScaling | None) -> None:
        if scaling is not None and len(scaling.rho) != self.layout.num_skips:
            raise ValueError(f"Skip-Tuning needs {self.layout.num_skips} ρ values for this UNet, got {len(scaling.rho)}")
        self.skip_scaling = scaling

    def set_step(self, index: int | None, total: int = 0) -> None:
        """The sampling loop's step (index of `total`) for the UNet calls that follow; None ends sampling."""
        if index is None:
            self.step = None
            return
        if not 0 <= index < total:
            raise ValueError(f"step {index} is outside 0..{total - 1}")
        self.step = (index, total)

    def step_end_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers' `callback_on_step_end`: moves the editor to the pipeline's next step (index i of len(timesteps)).
        Start a sampling loop with `set_step(0, steps)`."""
        if step + 1 < pipe.num_timesteps:
            self.set_step(step + 1, pipe.num_timesteps)
        return callback_kwargs

    def clear(self) -> None:
        """Remove every edit (the hooks stay attached and then change nothing); cached features stay."""
        self.sc_tuners.clear()
        self.set_conditions([])
        self.skip_scaling = None
        self.step = None
        self.guidance_halves = False
        self.guidance_scale = 1.0

    # -- training --------------------------------------------------------------------------------
    def tuner_modules(self) -> list[nn.Module]:
        return [use.tuner for use in self.sc_tuners.values()] + list({id(c.tuner): c.tuner for c in self.conditions}.values())

    def train_mode(self, enabled: bool = True) -> list[nn.Parameter]:
        """Freeze the UNet, make tuner parameters trainable, and run the encoder and mid block without
        autograd while enabled. Returns the trainable parameters."""
        self.training = enabled
        self.unet.requires_grad_(False)
        parameters = []
        for module in self.tuner_modules():
            module.train(enabled)
            module.requires_grad_(enabled)
            parameters += list(module.parameters())
        return parameters if enabled else []

    # -- hooks -----------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> SkipEditor:
        if self.attached:
            return self
        self._handles.append(self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._after_unet, always_call=True))
        for b, block in enumerate(self.unet.up_blocks):
            self._handles.append(block.register_forward_pre_hook(self._up_block_hook(b), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call_state.clear()

    def __enter__(self) -> SkipEditor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _in_range(self, step_range: tuple[float, float]) -> bool:
        return self.step is None or step_is_active(step_range, *self.step)

    def _before_unet(self, unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        textures = [use for use in self.sc_tuners.values() if use.texture and use.scale != 0]
        self._call_state = {"active": self._active_conditions(sample), "batch": batch, "textures": textures}
        if self.training and torch.is_grad_enabled():
            # Nothing before the decoder is trainable: record no autograd graph for it.
            torch.set_grad_enabled(False)
            self._call_state["restore_grad"] = True
        if not textures:
            return None
        # Texture guidance: one more copy of the prompt's rows per texture tuner, in the same call.
        prompt_rows = slice(self._prompt_start(batch), batch)

        def grow(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: grow(item) for key, item in value.items()}
            if torch.is_tensor(value) and value.ndim and value.shape[0] == batch:
                return torch.cat([value, *[value[prompt_rows]] * len(textures)])
            return value

        return tuple(grow(a) for a in args), grow(kwargs)

    def _after_unet(self, unet: nn.Module, args: tuple, output: Any) -> Any:
        if self._call_state.pop("restore_grad", False):
            torch.set_grad_enabled(True)
        state, self._call_state = self._call_state, {}
        if not state.get("textures") or output is None:
            return None
        prediction = output[0] if isinstance(output, tuple) else output.sample
        batch = state["batch"]
        start = self._prompt_start(batch)
        prompt = prediction[start:batch]
        change = torch.zeros_like(prompt, dtype=torch.float32)
        extra = batch
        for use in state["textures"]:
            tuned = prediction[extra: extra + len(prompt)]
            change += use.scale * high_pass(tuned.float() - prompt.float(), TEXTURE_BLUR_SIGMA)
            extra += len(prompt)
        if self.guidance_halves:
            change /= self.guidance_scale  # the pipeline multiplies ε_c − ε_u by g
        edited = torch.cat([prediction[:start], prompt + change.to(prompt.dtype)])
        return (edited, *output[1:]) if isinstance(output, tuple) else type(output)(sample=edited)

    def _prompt_start(self, batch: int) -> int:
        """The first row of the prompt's half of a UNet batch (diffusers' CFG order: [unconditional; conditional])."""
        return batch // 2 if self.guidance_halves else 0

    def _active_conditions(self, sample: torch.Tensor) -> list[_ActiveCondition]:
        active = []
        for condition, alpha, step_range in zip(self.conditions, self._applied_alphas, self._applied_step_ranges):
            if not self._in_range(step_range) or alpha == 0:
                continue
            features = self._features(condition.tuner, condition.image, sample)
            if condition.blend_image is not None and condition.blend > 0:
                other = self._features(condition.tuner, condition.blend_image, sample)
                features = interpolate_features(features, other, condition.blend)
            active.append(_ActiveCondition(condition, alpha, features, {}))
        return active

    def _features(self, tuner: CSCTuner, image: torch.Tensor, sample: torch.Tensor) -> ConditionFeatures:
        latent_size = (sample.shape[-2], sample.shape[-1])

        def compute() -> ConditionFeatures:
            return tuner.condition_features(self._hint_input(image, latent_size).to(sample.device))

        if torch.is_grad_enabled():  # training the condition branch: fresh features with a graph
            return compute()
        digest = self._digests.get(id(image))
        if digest is None:
            digest = self._digests[id(image)] = tensor_digest(image)
        # Checked and resized only on a miss: a hit was made from this image at this latent size.
        return self.cache.features(tuner, f"{digest}@{latent_size[0]}x{latent_size[1]}", compute)

    def _hint_input(self, image: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        picture = (self.pixels_per_latent * latent_size[0], self.pixels_per_latent * latent_size[1])
        if tuple(image.shape[-2:]) != picture:
            raise ValueError(
                f"condition image is {image.shape[-2]}×{image.shape[-1]} px but the picture is {picture[0]}×{picture[1]}: "
                "give the condition at the picture's size"
            )
        if self.pixels_per_latent == HINT_DOWNSAMPLE:
            return image
        # A VAE that is not x8 (the built-in x4 one): scale the condition so the hint encoder's fixed x8 meets the latents.
        hint_size = (HINT_DOWNSAMPLE * latent_size[0], HINT_DOWNSAMPLE * latent_size[1])
        return F.interpolate(image, size=hint_size, mode="bilinear", align_corners=False, antialias=True)

    def _up_block_hook(self, b: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._call_state.pop("restore_grad", False):
                torch.set_grad_enabled(True)
            positional = "res_hidden_states_tuple" not in kwargs
            skips = args[1] if positional else kwargs["res_hidden_states_tuple"]
            edited = tuple(self._edit(g, x) for g, x in zip(self.layout.up_block_skips[b], skips))
            if positional:
                return (args[0], edited, *args[2:]), kwargs
            return args, {**kwargs, "res_hidden_states_tuple": edited}

        return hook

    def _edit(self, g: int, x: torch.Tensor) -> torch.Tensor:
        out = x
        batch = self._call_state.get("batch", x.shape[0])
        prompt_start = self._prompt_start(batch)
        extra = batch  # texture guidance's copies of the prompt's rows follow the batch, one per texture tuner
        for use in self._call_state.get("textures", ()):
            rows = slice(extra, extra + batch - prompt_start)
            out = torch.cat([out[:rows.start], out[rows] + use.tuner.delta(g, x[rows]), out[rows.stop:]])
            extra = rows.stop
        for use in self.sc_tuners.values():
            if use.texture:
                continue
            if use.conditional_only and self.guidance_halves:
                out = torch.cat([out[:prompt_start], out[prompt_start:] + use.scale * use.tuner.delta(g, x[prompt_start:])])
            else:
                out = out + use.scale * use.tuner.delta(g, x)
        for active in self._call_state.get("active", ()):
            weight = active.weight * active.condition.skip_weight(g)
            if weight == 0:
                continue
            edit = active.condition.tuner(g, x, _broadcast(active.features[g], x.shape[0]))
            mask = active.mask_at(tuple(x.shape[-2:]), x)
            out = out + weight * (edit if mask is None else edit * mask)
        scaling = self.skip_scaling
        if scaling is not None and not scaling.is_identity and self._in_range(scaling.step_range):
            out = out * scaling.rho[g]
        return out
