"""Qwen2.5-VL's image side: its dynamic-resolution preprocessing (Qwen2VLImageProcessor's steps), its prompt form,
and the 3D rotary positions (M-RoPE) of a prompt with images.

Preprocessing: convert to RGB, resize with Pillow's bicubic filter to `smart_resize`'s size (both sides multiples of
patch_size x merge_size, the pixel count within [min_pixels, max_pixels], the aspect ratio kept as closely as it
can), rescale, normalize with CLIP's mean and std, then cut into patches of temporal_patch_size frames (a still
image repeats itself) x patch_size x patch_size. Our pixel values are transformers' [patches, C * T * P * P] rows
in the same order, kept as [grid_t, grid_h / merge, grid_w / merge, merge, merge, C * T * P * P] so that the image's
grid travels with them (`image_grid`); `.reshape(-1, row)` gives transformers' array.

Prompt: the chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image; each `<|image_pad|>` becomes
one per merged patch (grid_t * grid_h * grid_w / merge**2), as Qwen2_5_VLProcessor expands it.

Positions (transformers' get_rope_index): text tokens count up on all three axes; an image's tokens take
(start + t, start + row, start + column) on its merged grid, and the text after it resumes at start + max(rows,
columns). Positions past the prompt are the token's index plus the prompt's `delta` (last position + 1 - length).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ownllm.config import ModelConfig
from ownllm.multimodal import ImageInput, ImagePromptProcessor
from ownllm.multimodal.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize, rescale_and_normalize, to_rgb

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) -> the size both sides of which are multiples of `factor`, with min_pixels <= height * width
    <= max_pixels, as close to the image's aspect ratio as that allows (transformers' smart_resize)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"the image is {width}x{height} pixels: its aspect ratio is over {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLPreprocessing:
    """Qwen2VLImageProcessor's settings from a preprocessor_config.json (its class defaults otherwise)."""

    def __init__(self, config: dict) -> None:
        size = config.get("size") or {}
        self.min_pixels = int(config.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(config.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        self.patch_size = int(config.get("patch_size", 14))
        self.temporal_patch_size = int(config.get("temporal_patch_size", 2))
        self.merge_size = int(config.get("merge_size", 2))
        self.resample = int(config.get("resample", 3))  # bicubic
        self.do_resize = config.get("do_resize", True)
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
        normalize = config.get("do_normalize", True)
        self.image_mean = (config.get("image_mean") or OPENAI_CLIP_MEAN) if normalize else None
        self.image_std = (config.get("image_std") or OPENAI_CLIP_STD) if normalize else None

    def __call__(self, image: Image.Image) -> np.ndarray:
        """-> [1, grid_h / merge, grid_w / merge, merge, merge, C * T * P * P] float32 (see the module docstring)."""
        image = to_rgb(image)
        if self.do_resize:
            factor = self.patch_size * self.merge_size
            height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
            image = resize(image, height, width, self.resample)
        elif image.height % (self.patch_size * self.merge_size) or image.width % (self.patch_size * self.merge_size):
            raise ValueError(f"the image is {image.width}x{image.height} pixels, not multiples of "
                             f"{self.patch_size * self.merge_size} (preprocessor_config.json: do_resize is false)")
        pixels = rescale_and_normalize(np.asarray(image).transpose(2, 0, 1), self.rescale_factor, self.image_mean,
                                       self.image_std)  # [C, H, W]
        channels, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # a still image: t copies
        return np.ascontiguousarray(frames.reshape(1, grid_h // m, grid_w // m, m, m, channels * t * p * p))


def image_grid(pixel_values: np.ndarray | Sequence[int]) -> tuple[int, int, int]:
    """Pixel values as Qwen2VLPreprocessing makes them (or their shape) -> transformers' image_grid_thw
    (frames, patch rows, patch columns)."""
    t, rows, columns, m, _, _ = pixel_values.shape if hasattr(pixel_values, "shape") else pixel_values
    return t, rows * m, columns * m


def mrope_positions(num_prompt_tokens: int, images: Sequence[ImageInput]) -> tuple[np.ndarray, int]:
    """The prompt's M-RoPE positions [3, num_prompt_tokens] (temporal, height, width; int64) and its delta: a token
    at index i >= num_prompt_tokens is at position i + delta on all three axes."""
    positions = np.empty((3, num_prompt_tokens), dtype=np.int64)
    index = next_position = 0  # prompt index reached; the position the next text token takes
    for image in sorted(images, key=lambda i: i.offset):
        text = image.offset - index
        positions[:, index:image.offset] = np.arange(next_position, next_position + text)
        next_position += text
        t, rows, columns, _, _, _ = image.pixel_values.shape  # the merged grid: one token per cell
        if t * rows * columns != image.length:
            raise ValueError(f"an image of {t}x{rows}x{columns} merged patches has {image.length} placeholder tokens")
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(rows), np.arange(columns), indexing="ij"))
        positions[:, image.offset:image.end] = grid.reshape(3, -1) + next_position
        next_position += max(rows, columns)
        index = image.end
    positions[:, index:] = np.arange(next_position, next_position + num_prompt_tokens - index)
    last = int(positions.max()) if num_prompt_tokens else -1
    return positions, last + 1 - num_prompt_tokens


class Qwen2_5_VLImageProcessor(ImagePromptProcessor):
    def __init__(self, preprocessing: Qwen2VLPreprocessing, image_token_id: int) -> None:
        self.preprocessing = preprocessing
        self.image_token_id = image_token_id

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, preprocessor_config: dict[str, Any], tokenizer: "Tokenizer" = None
                        ) -> "Qwen2_5_VLImageProcessor":
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        settings = preprocessor_config
        # the tower's shape wins over a preprocessor_config.json that does not say
        settings = {"patch_size": vision.get("patch_size", 14), "merge_size": vision.get("spatial_merge_size", 2),
                    "temporal_patch_size": vision.get("temporal_patch_size", 2), **settings}
        preprocessing = Qwen2VLPreprocessing(settings)
        for key, ours in (("patch_size", preprocessing.patch_size), ("spatial_merge_size", preprocessing.merge_size),
                          ("temporal_patch_size", preprocessing.temporal_patch_size)):
            if key in vision and int(vision[key]) != ours:
                raise ValueError(f"preprocessor_config.json's {key} {ours} differs from the vision tower's "
                                 f"{vision[key]}")
        return cls(preprocessing, int(hf.get("image_token_id", 151655)))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.preprocessing(image)

    def num_image_tokens(self, pixel_values: np.ndarray) -> int:
        t, rows, columns = pixel_values.shape[:3]
        return t * rows * columns
