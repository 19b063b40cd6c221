"""How the α of several CSC conditions combine: pure Python, so the app's requests can state the α applied."""
from __future__ import annotations

from collections.abc import Sequence

from tuners.validation import UserInputError

# Two shipped condition tuners at α = 1 each overshoot together (canny + colour: edge F1 0.686, colour error 15.7,
# each alone 0.757 / 13.4, on the 16,400-step base); at 0.6 each they beat either alone on both (0.775 / 12.6;
# 0.5: 0.749 / 12.9, 0.7: 0.776 / 13.2). On the v-prediction base each alone is closer still (0.895 / 9.3) and no
# α of 0.4-0.75 beats both; 0.6 stays within 0.03 / 1.5 of each (docs/training.md "Composed conditions" and
# "The shipped tuners on the v-prediction base").
ALPHA_MODES = ("cap", "normalise", "raw")
DEFAULT_ALPHA_MODE = "cap"
COMPOSED_ALPHA_CAP = 1.2


def composed_alphas(alphas: Sequence[float], mode: str = DEFAULT_ALPHA_MODE) -> list[float]:
    """The α each of several conditions is applied with.

    ``cap``: two or more conditions (α > 0) whose α sum above `COMPOSED_ALPHA_CAP` are scaled down to sum to it (ratios
    kept; one condition keeps its α). ``normalise``: divided by their sum, Σα = 1 (the paper). ``raw``: as given
    (SCEPTER's reference code). An unknown mode, or α it cannot normalise, is a `UserInputError`.
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
