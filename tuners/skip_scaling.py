"""Per-skip factors: Skip-Tuning's training-free ρ_g (x'_g = ρ_g · x_g) and per-skip α presets for conditions."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuners.layout import SkipLayout
from tuners.validation import WEIGHT_RANGE, check_choice, check_number, check_per_skip, check_step_range


def rho_schedule(num_skips: int, rho_outer: float = 1.0, rho_inner: float = 1.0) -> tuple[float, ...]:
    """Linear from ρ_outer at g = 0 (conv_in, highest resolution) to ρ_inner at g = K−1."""
    if num_skips < 2:
        return (rho_outer,) * num_skips
    return tuple(rho_outer + g / (num_skips - 1) * (rho_inner - rho_outer) for g in range(num_skips))


@dataclass(frozen=True)
class SkipScaling:
    """ρ per skip, active during `step_range`, a fraction of the sampling steps (0 = first, 1 = after the last)."""

    rho: tuple[float, ...]
    step_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_per_skip("ρ", self.rho, None, *WEIGHT_RANGE))
        object.__setattr__(self, "step_range", check_step_range("Skip-Tuning step range", self.step_range))

    @classmethod
    def linear(
        cls,
        num_skips: int,
        rho_outer: float = 1.0,
        rho_inner: float = 1.0,
        overrides: Mapping[int, float] | None = None,
        step_range: tuple[float, float] = (0.0, 1.0),
    ) -> SkipScaling:
        """The linear schedule, with per-skip values in `overrides` taking precedence."""
        rho = list(rho_schedule(num_skips, rho_outer, rho_inner))
        for g, value in (overrides or {}).items():
            check_number("skip index", g, 0, num_skips - 1, integer=True)
            rho[g] = value
        return cls(tuple(rho), step_range)

    @property
    def is_identity(self) -> bool:
        return all(r == 1.0 for r in self.rho)


# Per-skip α presets for a condition, by resolution: "outer" are the skips at full latent size (g = 0
# up to the first downsampler; DESIGN.md §6 calls g = 0 the outermost), "inner" all the others.
SKIP_WEIGHT_PRESETS = ("all skips", "outer skips only", "inner skips only")


def skip_weight_preset(layout: SkipLayout, preset: str) -> tuple[float, ...]:
    """Per-skip α multipliers (encoder order g) for one of `SKIP_WEIGHT_PRESETS`.

    "outer skips only" keeps the skips at full latent resolution (fine detail: edges, texture);
    "inner skips only" keeps the lower-resolution skips (coarse layout and colour regions).
    """
    levels = [layout.downsamples_before(g) for g in range(layout.num_skips)]
    check_choice("per-skip preset", preset, SKIP_WEIGHT_PRESETS)
    if preset == "all skips":
        return (1.0,) * layout.num_skips
    if preset == "outer skips only":
        return tuple(1.0 if level == 0 else 0.0 for level in levels)
    return tuple(0.0 if level == 0 else 1.0 for level in levels)
