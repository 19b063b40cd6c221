"""The one validation layer: numbers, ranges and names, checked where they enter, with one message style.

`UserInputError` is raised here (the lowest layer) so that the library, the app's requests and its
training config all fail the same way; the app shows it once at its edge (CLI exit code 2, UI toast).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

# α of a condition, ρ of a skip and per-skip α: 0 switches an edit off, above 1 exaggerates it.
WEIGHT_RANGE = (0.0, 4.0)
# The scale of an SC tuner: negative values push away from its style.
SCALE_RANGE = (-4.0, 4.0)


class UserInputError(ValueError):
    """Bad input or a missing resource, with a message that tells the user what to do.

    The CLI prints it on one line and exits with code 2; the UI shows it as a toast.
    """


def check_number(name: str, value: Any, low: float, high: float, *, integer: bool = False) -> float:
    """`value` if it is a finite number (a whole one with `integer`) in [low, high], else `UserInputError`."""
    kind = "a whole number" if integer else "a number"
    is_number = isinstance(value, Integral if integer else Real) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and low <= value <= high):
        raise UserInputError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return value


def check_per_skip(name: str, values: Any, num_skips: int | None, low: float, high: float) -> tuple[float, ...]:
    """One number in [low, high] per skip (encoder order g); `num_skips` None leaves the count unchecked."""
    if not isinstance(values, (tuple, list)):
        raise UserInputError(f"{name} must be a list of numbers, one per skip, got {values!r}")
    for g, value in enumerate(values):
        check_number(f"{name} of skip {g}", value, low, high)
    if num_skips is not None and len(values) != num_skips:
        raise UserInputError(f"{name} has {len(values)} values, but this model has {num_skips} skips; pick a preset or give {num_skips}")
    return tuple(float(v) for v in values)


def check_step_range(name: str, step_range: Any) -> tuple[float, float]:
    """(start, end) as fractions of the sampling steps, 0 ≤ start ≤ end ≤ 1, else `UserInputError`."""
    try:
        start, end = (float(x) for x in step_range)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be two numbers (start, end), got {step_range!r}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise UserInputError(f"{name} must satisfy 0 ≤ start ≤ end ≤ 1, got {step_range}")
    return start, end


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`, else `UserInputError` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise UserInputError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value
