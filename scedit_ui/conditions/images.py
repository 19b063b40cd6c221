"""Pictures in, pictures out: reading any PIL-readable input safely, sizes, fitting to the generation size, masks."""
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tuners.validation import UserInputError

DEFAULT_MAX_PIXELS = 40_000_000  # refuse bigger pictures before decoding them (decompression bombs)
MAX_SIDE = 8192
MASK_FILL = 128  # every channel of a masked pixel in inpaint/outpaint conditions
FIT_MODES = ("crop", "resize", "pad")

Size = tuple[int, int]  # (width, height)
Box = tuple[int, int, int, int]  # (left, top, right, bottom)


def validate_size(size: Any) -> Size:
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise UserInputError(f"size must be (width, height), not {size!r}") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise UserInputError(f"size {width}x{height} is out of range: each side must be 1 to {MAX_SIDE} pixels")
    return width, height


# --- geometry ------------------------------------------------------------------------------------------------


def fit_image(image: Image.Image, size: Size, fit: str = "crop", *, resample: int = Image.Resampling.BICUBIC) -> tuple[Image.Image, Box]:
    """`image` brought to `size`: the resized image and the box it fills in a `size` canvas.

    "crop" scales to cover and centre-crops, "resize" stretches (both fill the whole box); "pad" scales to fit
    inside and centres, leaving the rest of the canvas to the caller.
    """
    width, height = size
    if fit == "resize":
        return image.resize(size, resample), (0, 0, width, height)
    if fit == "crop":
        return ImageOps.fit(image, size, resample), (0, 0, width, height)
    if fit == "pad":
        scale = min(width / image.width, height / image.height)
        inner = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
        left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
        return image.resize(inner, resample), (left, top, left + inner[0], top + inner[1])
    raise UserInputError(f"fit must be one of {', '.join(FIT_MODES)}, not {fit!r}")


def inpaint_condition(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked-image condition: `image` with every pixel where `mask` is 255 set to grey `MASK_FILL`."""
    if image.size != mask.size:
        raise UserInputError(f"mask size {mask.size} differs from image size {image.size}")
    filled = Image.new("RGB", image.size, (MASK_FILL,) * 3)
    return Image.composite(filled, image.convert("RGB"), mask_from_image(mask))


def outpaint_condition(
    image: Image.Image, size: Size, *, left: float, top: float, right: float, bottom: float, fit: str = "crop"
) -> tuple[Image.Image, Image.Image]:
    """Extended canvas and mask: `image` fitted into `size` minus the borders (fractions of `size`).

    The canvas is grey `MASK_FILL` outside the picture; the mask is 255 there (the area to generate), 0 on it.
    """
    width, height = validate_size(size)
    if left + right >= 1 or top + bottom >= 1:
        raise UserInputError(f"outpaint borders leave no room for the picture (left+right={left + right:g}, top+bottom={top + bottom:g}; each must stay below 1)")
    box = (round(left * width), round(top * height), width - round(right * width), height - round(bottom * height))
    inner_size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    fitted, inner_box = fit_image(image, inner_size, fit)
    canvas = Image.new("RGB", size, (MASK_FILL,) * 3)
    mask = Image.new("L", size, 255)
    offset = (box[0] + inner_box[0], box[1] + inner_box[1])
    canvas.paste(fitted, offset)
    mask.paste(0, (*offset, offset[0] + fitted.width, offset[1] + fitted.height))
    return canvas, mask


def mask_from_image(mask: Image.Image) -> Image.Image:
    """A drawn mask as an "L" image of 0/255: its alpha if it has transparency, else its brightness (> 127)."""
    gray = None
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            gray = alpha
    if gray is None:
        gray = mask.convert("L") if mask.mode in ("L", "1") else normalize_image(mask).convert("L")
    return gray.point(lambda v: 255 if v > 127 else 0)



# --- reading pictures ---------------------------------------------------------------------------------------


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Read a picture as RGB (see `normalize_image`), refusing non-images and pictures over `max_pixels`.

    `name` is how messages call the file (default: its path; a server passes the uploaded file's name).
    """
    return normalize_image(_open(source, max_pixels, name), max_pixels=max_pixels)


def load_mask(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a mask as "L" 0/255 (see `mask_from_image`): white or opaque = area to generate."""
    return mask_from_image(_open(source, max_pixels))


def normalize_image(image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`image` as 8-bit RGB, upright per its EXIF orientation.

    Transparency is composited over white; 16-bit and float images are scaled to 8 bits.
    """
    _check_pixels(image.size, max_pixels, "the picture")
    if image.mode == "RGB" and not image.getexif().get(0x0112):
        return image
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UserInputError(f"cannot convert a picture of mode {image.mode} to RGB: {error}") from None


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write `image` to `path` (format from the extension), with a clear error when that fails."""
    path = Path(path)
    try:
        image.save(path)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot write {path}: {error}") from None
    return path


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    values = array.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
    elif mode.startswith("I;16") or values.max(initial=0) > 255:
        scale = 255.0 / max(65535.0, values.max(initial=0))  # 16-bit data
    else:
        scale = 1.0
    return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)


def _check_pixels(size: Size, max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise UserInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f}; shrink it first"
        )
    if width < 1 or height < 1:
        raise UserInputError(f"{name} is empty ({width}x{height})")


def _open(source: str | Path | bytes, max_pixels: int, name: str | None = None) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        name, stream = name or "the uploaded data", io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        name, stream = name or str(source), Path(source)
        if len(name) > 200:  # a name too long for the file system would fill the screen
            name = f"{name[:200]}…"
        try:
            if not stream.is_file():
                raise UserInputError(f"{name}: no such file")
        except OSError as error:
            raise UserInputError(f"{name}: cannot be opened ({error.strerror})") from None
    else:
        raise UserInputError(f"expected a file path or image bytes, not {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own limit, checked below before decoding, replaces Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError:
        raise UserInputError(f"{name} is too large to open safely; shrink it below {max_pixels / 1e6:.0f} megapixels first") from None
    except UnidentifiedImageError:
        raise UserInputError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from None
    except OSError as error:
        raise UserInputError(f"cannot read {name}: {error}") from None
    _check_pixels(image.size, max_pixels, name)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise UserInputError(f"{name} is truncated or corrupt: {error}") from None
    return image



# --- command line ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> Size:
    """'512x384' -> (512, 384); '512' -> (512, 512)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise UserInputError(f"size must look like WIDTHxHEIGHT (e.g. 512x512), not {text!r}") from None
    if len(numbers) not in (1, 2):
        raise UserInputError(f"size must look like WIDTHxHEIGHT (e.g. 512x512), not {text!r}")
    return validate_size(numbers * 2 if len(numbers) == 1 else numbers)

