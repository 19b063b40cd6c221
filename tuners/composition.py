"""How several CSC conditions combine: their α, and when an edge condition lets go. Pure Python, so the app's
requests can state what is applied."""
from __future__ import annotations

from collections.abc import Sequence

from tuners.validation import UserInputError

ALPHA_MODES = ("staged", "cap", "normalise", "raw")
DEFAULT_ALPHA_MODE = "staged"
# Two shipped condition tuners at α = 1 each overshot together on the 16,400-step base (canny + colour: edge F1 0.686,
# colour error 15.7, each alone 0.757 / 13.4); at 0.6 each they beat either alone on both, hence the cap. On the
# v-prediction base no α of 0.4-0.75 beats both (docs/training.md "Composed conditions").
COMPOSED_ALPHA_CAP = 1.2
# Edge maps say where lines go, which the early steps settle; in the last steps the canny tuner moves the colours (alone,
# colour error 12.5 over all steps, 10.0 ending at 0.85). With a condition that sets the colours beside it, the edge
# condition ends at 0.85 of the steps: canny + colour at α 1 each give edge F1 0.910 / colour error 8.40 against 0.895 /
# 12.5 and 0.666 / 9.3 alone on the 21,500-step base (ending at 0.8: 0.901 / 8.29, at 0.9: 0.916 / 8.87), 0.908 / 7.01
# against 0.900 / 10.8 and 0.733 / 7.49 on the 22,500-step base (docs/training.md "Staged composition").
EDGE_CONDITIONS = frozenset({"canny", "hed", "sketch", "scribble", "lineart"})
COLOUR_CONDITIONS = frozenset({"color", "colour", "inpaint", "outpaint"})
EDGE_CONDITION_END = 0.85


def composed_alphas(alphas: Sequence[float], mode: str = DEFAULT_ALPHA_MODE) -> list[float]:
    """The α each of several conditions is applied with.

    ``staged`` and ``raw``: as given (``raw`` is SCEPTER's reference code). ``cap``: two or more conditions (α > 0)
    whose α sum above `COMPOSED_ALPHA_CAP` are scaled down to sum to it (ratios kept; one condition keeps its α).
    ``normalise``: divided by their sum, Σα = 1 (the paper). An unknown mode, or α it cannot normalise, is a
    `UserInputError`.
    """
    if mode not in ALPHA_MODES:
        raise UserInputError(f"α mode must be one of {', '.join(ALPHA_MODES)}, got {mode!r}")
    total = sum(alphas)
    if mode == "normalise":
        if alphas and total <= 0:
            raise UserInputError("cannot normalise α: the weights sum to 0 or less")
        return [a / total for a in alphas]
    if mode == "cap" and sum(a > 0 for a in alphas) > 1 and total > COMPOSED_ALPHA_CAP:
        return [a * COMPOSED_ALPHA_CAP / total for a in alphas]
    return list(alphas)


def composed_step_ranges(
    kinds: Sequence[str], alphas: Sequence[float], step_ranges: Sequence[tuple[float, float]], mode: str = DEFAULT_ALPHA_MODE,
) -> list[tuple[float, float]]:
    """The fraction of the sampling steps each condition is applied over.

    ``staged``: when a condition that sets the colours (`COLOUR_CONDITIONS`, α > 0) is composed with edge conditions
    (`EDGE_CONDITIONS`, α > 0), each edge condition ends at `EDGE_CONDITION_END` at the latest. Otherwise, and in
    every other mode, the ranges as given.
    """
    ranges = [tuple(r) for r in step_ranges]
    active = {kind for kind, alpha in zip(kinds, alphas) if alpha > 0}
    if mode != "staged" or not active & COLOUR_CONDITIONS or not active & EDGE_CONDITIONS:
        return ranges
    return [
        (start, min(end, EDGE_CONDITION_END)) if kind in EDGE_CONDITIONS and alpha > 0 and start < EDGE_CONDITION_END else (start, end)
        for kind, alpha, (start, end) in zip(kinds, alphas, ranges)
    ]
