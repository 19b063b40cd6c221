"""Skip-Tuning: training-free scaling ρ_g of each skip connection (x'_g = ρ_g · x_g)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


def rho_schedule(num_skips: int, rho_outer: float = 1.0, rho_inner: float = 1.0) -> tuple[float, ...]:
    """Linear from ρ_outer at g = 0 (conv_in, highest resolution) to ρ_inner at g = K−1."""
    if num_skips < 2:
        return (rho_outer,) * num_skips
    return tuple(rho_outer + g / (num_skips - 1) * (rho_inner - rho_outer) for g in range(num_skips))


@dataclass(frozen=True)
class SkipScaling:
    """ρ per skip, active for denoising progress in `step_range` (0 = first step, 1 = last)."""

    rho: tuple[float, ...]
    step_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not all(math.isfinite(r) and 0.0 <= r <= 4.0 for r in self.rho):
            raise ValueError(f"every ρ must be a finite number in [0, 4], got {self.rho}")
        start, end = self.step_range
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"step_range must satisfy 0 ≤ start ≤ end ≤ 1, got {self.step_range}")

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
            if not 0 <= g < num_skips:
                raise ValueError(f"skip index {g} is out of range for {num_skips} skips")
            rho[g] = value
        return cls(tuple(rho), step_range)

    @property
    def is_identity(self) -> bool:
        return all(r == 1.0 for r in self.rho)
