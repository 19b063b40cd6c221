"""Malformed and unusual inputs for the hardening tests: broken images, files posing as tuners, hostile names."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from tuners import SCTuner, SkipLayout, TunerMetadata, save_tuner


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` RGB pixels, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def _noise(size: int = 64) -> Image.Image:
    return Image.effect_noise((size, size), 60).convert("RGB")


# Files no entry point may accept: each is refused with a message that matches the pattern.
BROKEN_IMAGES: dict[str, tuple[bytes, str]] = {
    "not an image": (b"this is a text file, not a picture", "not an image"),
    "truncated PNG": (png_bytes(_noise())[:200], "truncated or corrupt|not an image"),
    "truncated JPEG": (png_bytes(_noise(), "JPEG")[:400], "truncated or corrupt|cannot read|not an image"),
    "0x0 PNG": (png_claiming(0, 0), "not an image|empty"),
    "decompression bomb": (png_claiming(30_000, 30_000), "too large to open safely"),
}


def unusual_images() -> dict[str, tuple[Image.Image, str, tuple[int, int, int]]]:
    """Pictures every entry point accepts: (image, file suffix, the RGB colour a user expects to see)."""
    return {
        "1x1": (Image.new("RGB", (1, 1), (200, 30, 40)), ".png", (200, 30, 40)),
        "RGBA half transparent": (Image.new("RGBA", (32, 32), (255, 0, 0, 128)), ".png", (255, 127, 127)),  # over white
        "CMYK JPEG": (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
        "16-bit grey": (Image.new("I;16", (32, 32), 40_000), ".png", (156, 156, 156)),  # 40000 / 65535 of full scale
    }


def save_picture(image: Image.Image, path: Path) -> Path:
    image.save(path, quality=100) if path.suffix == ".jpg" else image.save(path)
    return path


class CreatesFile:
    """Unpickling this object opens (creates) `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def code_running_pickle(marker: Path) -> bytes:
    return pickle.dumps({"lsc_identity.0.ln1.weight": CreatesFile(marker)})


def damaged_tuner_files(layout: SkipLayout, folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Files that pose as tuners for `layout`, each with the pattern of the message that refuses it."""
    folder.mkdir(parents=True, exist_ok=True)
    describe = TunerMetadata.describe(SCTuner(layout, 0.5), "test")
    header = json.dumps({**describe.__dict__, "skip_channels": list(layout.channels), "skip_downsample": list(layout.is_downsample)})
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, pattern: str) -> Path:
        files[name] = (folder / f"{name}.safetensors", pattern)
        return files[name][0]

    add("random-bytes", "not a readable safetensors file").write_bytes(bytes(range(256)) * 4)
    add("pickle-renamed", "not a readable safetensors file").write_bytes(code_running_pickle(marker))
    save_file({"adapters.0.ln1.weight": torch.zeros(3, 3)}, add("no-metadata", "no SCEdit metadata|no SCEdit tuner keys"))
    save_file({"adapters.0.ln1.weight": torch.zeros(3, 3)}, add("wrong-shapes", "weights do not fit its own metadata"),
              metadata={"scedit": header})
    save_file({"a": torch.zeros(1)}, add("metadata-a-list", "metadata is a JSON list"), metadata={"scedit": "[1, 2, 3]"})
    save_file({"a": torch.zeros(1)}, add("metadata-wrong-types", "skip_channels must be a list"),
              metadata={"scedit": json.dumps({**json.loads(header), "skip_channels": "abc"})})
    other = SkipLayout((4,) * len(layout.channels), layout.is_downsample, layout.up_block_skips)
    foreign = SCTuner(other, 0.5)
    save_tuner(foreign, add("other-layout", "was built for a UNet with"), TunerMetadata.describe(foreign, "other"))
    return files


# Names a user (or an attacker) may type where a tuner name is expected.
HOSTILE_NAMES = ("../../escaped", "/etc/passwd", "..", "nul\x00byte", "sub/dir\\name", "x" * 5000, "ünïcode ☃")
