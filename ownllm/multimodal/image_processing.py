"""Image preprocessing of our own (Pillow + numpy), step for step what Hugging Face's PIL image processors do,
so pixel values match theirs: RGB conversion (transparency composited onto white), resizing (Pillow's filters),
center crop (zero-padding an image smaller than the crop), rescale and normalize. Pure functions; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; an alpha channel (or a palette's transparency) is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side `shortest_edge` and the longer scaled down to an integer (torchvision's
    rule, as transformers' get_resize_output_image_size applies it)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image.resize((width, height), resample=Image.Resampling(resample))


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """pixels: [C, H, W] -> [C, height, width], centered; an image smaller than the crop is zero-padded first."""
    orig_h, orig_w = pixels.shape[-2:]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[..., top:top + height, left:left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros(pixels.shape[:-2] + (new_h, new_w), dtype=pixels.dtype)
    pad_top, pad_left = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded[..., pad_top:pad_top + orig_h, pad_left:pad_left + orig_w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[..., max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def rescale_and_normalize(pixels: np.ndarray, scale: float | None, mean: Sequence[float] | None,
                          std: Sequence[float] | None) -> np.ndarray:
    """pixels: [C, H, W] uint8 -> float32 (x * scale - mean) / std, rounding where transformers rounds."""
    out = pixels.astype(np.float32)
    if scale is not None:
        out = (pixels.astype(np.float64) * scale).astype(np.float32)
    if mean is not None:
        mean_array, std_array = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
        out = ((out.T - mean_array) / std_array).T
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class ClipImageProcessor:
    """CLIPImageProcessor's steps from a preprocessor_config.json: resize the shortest edge (or to a fixed
    height x width), center crop, rescale, normalize -> [3, crop height, crop width] float32."""

    size: dict[str, int]
    crop_size: dict[str, int] | None
    resample: int = 3  # bicubic
    rescale_factor: float | None = 1 / 255
    image_mean: Sequence[float] | None = OPENAI_CLIP_MEAN
    image_std: Sequence[float] | None = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ClipImageProcessor":
        def square(value, default):
            value = default if value is None else value
            return {"height": value, "width": value} if isinstance(value, int) else dict(value)

        size = config.get("size", {"shortest_edge": 224})
        size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
        return cls(
            size=size if config.get("do_resize", True) else {},
            crop_size=square(config.get("crop_size"), 224) if config.get("do_center_crop", True) else None,
            resample=int(config.get("resample", 3)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            image_mean=config.get("image_mean", OPENAI_CLIP_MEAN) if config.get("do_normalize", True) else None,
            image_std=config.get("image_std", OPENAI_CLIP_STD) if config.get("do_normalize", True) else None,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        if "shortest_edge" in self.size:
            height, width = shortest_edge_size(image.height, image.width, self.size["shortest_edge"])
            image = resize(image, height, width, self.resample)
        elif self.size:
            image = resize(image, self.size["height"], self.size["width"], self.resample)
        pixels = np.asarray(image).transpose(2, 0, 1)  # [3, H, W] uint8
        if self.crop_size is not None:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return rescale_and_normalize(pixels, self.rescale_factor, self.image_mean, self.image_std)
