"""Images from what users send: PIL images as they are, encoded bytes (PNG, JPEG, WebP, ...) decoded with Pillow,
files by path. Every refusal is one ValueError that names the problem."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ownllm.multimodal import MAX_IMAGE_BYTES

MAX_IMAGE_PIXELS = 64 * 2**20  # and a decoded one over this (a decompression bomb)


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    if len(data) > max_bytes:
        raise ValueError(f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"the image is {opened.width}x{opened.height} pixels, over the limit of "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise ValueError("the image data is not a valid image (PNG, JPEG, WebP, GIF, BMP, ...)") from None


def load_image_file(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    return decode_image(path.read_bytes())


def as_image(value: Any) -> Image.Image:
    """A PIL image, or encoded image bytes -> a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value))
    raise ValueError(f"an image must be a PIL image or encoded image bytes, got {type(value).__name__}")
