"""How tab functions meet Gradio: user errors become one toast, GPU work is marked for Spaces."""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from typing import Any

import gradio as gr
from PIL import Image

from tuners.validation import UserInputError

GPU_QUEUE = "gpu"  # concurrency_id shared by every event that runs the base model


def user_errors(fn: Callable) -> Callable:
    """Show a `UserInputError` as a Gradio error toast with its message only (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def on_gpu(fn: Callable) -> Callable:
    """`spaces.GPU(fn)` on Hugging Face Spaces (ZeroGPU), `fn` itself everywhere else."""
    if importlib.util.find_spec("spaces") is None:
        return fn
    import spaces

    return spaces.GPU(fn)


def step_progress(progress: Callable | None, desc: str) -> Callable[[int, int], None] | None:
    """A `(step, total)` callback that moves a `gr.Progress` bar."""
    if progress is None:
        return None
    return lambda step, total: progress((step, total), desc=desc, unit="steps")


def whole_number(name: str, value: Any) -> int:
    """`value` as an int, or `UserInputError` when it is missing or has a fractional part."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def readable_upload(component: gr.components.Component, what: str) -> gr.components.Component:
    """Report an upload that Pillow cannot read as one clear error instead of a failed request.

    Gradio opens uploaded images while preprocessing, before any event function runs, so this is the one
    place such a file can be named to the user.
    """
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Image.DecompressionBombError:  # Pillow refuses it at open, before our own pixel limit is checked
            raise gr.Error(f"the {what} is too large to open safely; upload a picture under 40 megapixels", print_exception=False) from None
        except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
            raise gr.Error(f"the {what} is not an image that can be read; upload a PNG, JPEG, WebP, BMP or TIFF file", print_exception=False) from None

    component.preprocess = checked
    return component


def clear_value_errors(demo: gr.Blocks) -> None:
    """Make every input component of `demo` report a value it cannot take as one error that names it.

    Gradio's own preprocessing fails without a message on values a browser never sends but an API client
    can: nothing or text for a number, NaN for a whole number.
    """
    for block in demo.blocks.values():
        if isinstance(block, gr.components.Component):
            block.preprocess = _named_value_errors(block.preprocess, block.label or type(block).__name__)


def _named_value_errors(preprocess: Callable, label: str) -> Callable:
    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:  # Gradio's own messages (out of range, not a choice) are clear already
            raise
        except (TypeError, ValueError, OverflowError):
            shown = repr(payload) if len(repr(payload)) <= 60 else f"{repr(payload)[:60]}…"
            raise gr.Error(f"{label}: {shown} is not a valid value", print_exception=False) from None

    return checked


def optional_keywords(fn: Callable, keyword_inputs: dict[str, gr.components.Component]) -> Callable:
    """`fn` (taking `**kwargs`) declaring each empty keyword input as `name=None`, so API clients may leave it out.

    Gradio makes an API parameter optional when its component has a value or the function gives it a
    default; the keywords collected by `**kwargs` have neither.
    """
    signature = inspect.signature(fn)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    empty = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name, c in keyword_inputs.items() if c.value is None]
    fn.__signature__ = signature.replace(parameters=[*parameters, *empty, *rest])
    return fn
