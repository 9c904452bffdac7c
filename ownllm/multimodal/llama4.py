"""Llama 4's image side: its preprocessing (Llama4ImageProcessor's steps) and its prompt form (Llama4Processor's).

Preprocessing, per image (transformers' processor is a torchvision one; these are the same steps in torch):
1. RGB (transparency composited onto white), a uint8 tensor [3, H, W].
2. The canvas: among the tile grids of at most `max_patches` tiles (tile = `size`, 336 x 336), the one the image
   scales onto with the smallest upscale (or, when none upscales, the least downscale); ties go to the smaller area.
3. Resize without distortion to fit the canvas (upscaling only as far as one tile side, unless resize_to_max_canvas),
   with torchvision's tensor resize (antialiased; bilinear runs natively on uint8 where torchvision does so: on CPUs
   whose capability string names AVX2, else in float32, rounded back to uint8), then pad right and bottom with 0.
4. Rescale and normalize in bfloat16, as transformers' Llama4ImageProcessor does (x.bf16 * 1/255, - mean, / std).
5. Cut into rows x cols tiles, row-major; when there is more than one, add the global tile: the whole image resized
   to one tile (step 3's resize and step 4).
-> [tiles (+1), 3, 336, 336] float32 (exact bfloat16 values).

Prompt form: each `<|image|>` the chat template writes becomes
`<|image_start|>` (rows x cols > 1: for each row, for each tile, tokens_per_tile x `<|patch|>` with
`<|tile_x_separator|>` between tiles, then `<|tile_y_separator|>`) `<|image|>` tokens_per_tile x `<|patch|>`
`<|image_end|>`, tokens_per_tile = (336 / patch_size)^2 * pixel_shuffle_ratio^2 (144). The `<|patch|>` tokens get the
vision tower's rows; each tile's run of them is an ImageInput of its own (one tile's pixel values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ownllm.config import ModelConfig
from ownllm.multimodal import ImageInput, ImagePromptProcessor
from ownllm.multimodal.image_processing import to_rgb

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample -> torch interpolate mode
SPECIAL_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>")


def tile_grids(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) of every grid of at most max_tiles tiles, grouped by aspect ratio in the order each ratio first
    appears counting down from max_tiles (the order decides nothing but equal-area ties, kept as transformers)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_canvas(height: int, width: int, canvases: torch.Tensor, to_max: bool) -> tuple[int, int]:
    """canvases: [N, 2] int (height, width) -> the one the image scales onto best (see the module docstring)."""
    scales = torch.minimum(canvases[:, 0] / height, canvases[:, 1] / width)  # float32, as transformers computes
    upscales = scales[scales >= 1]
    if len(upscales):
        chosen = upscales.max() if to_max else upscales.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]  # the first of the smallest area
    return int(best[0]), int(best[1])


def fit_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """The largest (height, width) of the image's aspect ratio within max_height x max_width (floored)."""
    scale_w, scale_h = max_width / width, max_height / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), max_height), 1), max(max_width, 1)
    return max(max_height, 1), max(min(math.floor(width * scale_h), max_width), 1)


def native_uint8_resize(mode: str) -> bool:
    """Whether torchvision resizes a uint8 CPU tensor in uint8 (else in float32, rounded back)."""
    if mode == "bilinear":
        return "AVX2" in torch.backends.cpu.get_cpu_capability()
    return mode == "bicubic"


def resize_uint8(pixels: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """pixels: [3, H, W] uint8 -> [3, height, width] uint8, as torchvision's antialiased tensor resize."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    batch = pixels[None]
    if native_uint8_resize(mode):
        return F.interpolate(batch, size=(height, width), mode=mode, align_corners=False, antialias=True)[0]
    out = F.interpolate(batch.float(), size=(height, width), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)[0]


@dataclass(frozen=True)
class Llama4Preprocessing:
    """Llama4ImageProcessor's settings from a preprocessor_config.json (its class defaults otherwise)."""

    tile_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    resample: int = 2
    rescale_factor: float | None = 1 / 255
    image_mean: Sequence[float] | None = (0.5, 0.5, 0.5)
    image_std: Sequence[float] | None = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Llama4Preprocessing":
        size = config.get("size") or {"height": 336, "width": 336}
        size = {"height": size, "width": size} if isinstance(size, int) else size
        if size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor_config.json: Llama 4 tiles are square, got size {size}")
        if config.get("do_resize") is False:
            raise ValueError("preprocessor_config.json: Llama 4 always resizes; do_resize false is not supported")
        resample = int(config.get("resample", 2))
        if resample not in _MODES:
            raise ValueError(f"preprocessor_config.json: resample {resample} is not supported for Llama 4 "
                             f"(supported: {sorted(_MODES)})")
        normalize = config.get("do_normalize", True)
        return cls(
            tile_size=int(size["height"]), max_patches=int(config.get("max_patches", 16)),
            resize_to_max_canvas=bool(config.get("resize_to_max_canvas", False)), resample=resample,
            rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            image_mean=tuple(config.get("image_mean", (0.5,) * 3)) if normalize else None,
            image_std=tuple(config.get("image_std", (0.5,) * 3)) if normalize else None,
        )

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., 3, h, w] uint8 -> float, in bfloat16 when both rescaling and normalizing (as transformers)."""
        out = pixels
        if self.rescale_factor is not None:
            out = (out.to(torch.bfloat16) if self.image_mean is not None else out.float()) * self.rescale_factor
        if self.image_mean is not None:
            out = out if out.is_floating_point() else out.float()
            mean = torch.tensor(self.image_mean, dtype=out.dtype)[:, None, None]
            std = torch.tensor(self.image_std, dtype=out.dtype)[:, None, None]
            out = (out - mean) / std
        return out.float()

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """-> (pixel values [tiles (+1 global), 3, tile, tile] float32, (rows, cols) of the tile grid)."""
        tile, mode = self.tile_size, _MODES[self.resample]
        pixels = torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
        height, width = pixels.shape[-2:]
        canvases = torch.tensor([(rows * tile, cols * tile) for rows, cols in tile_grids(self.max_patches)])
        canvas_h, canvas_w = best_canvas(height, width, canvases, self.resize_to_max_canvas)
        limit_h, limit_w = canvas_h, canvas_w
        if not self.resize_to_max_canvas:  # upscale no further than one tile side
            limit_h, limit_w = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
        resized = resize_uint8(pixels, *fit_size(height, width, limit_h, limit_w), mode)
        canvas = F.pad(resized, (0, canvas_w - resized.shape[-1], 0, canvas_h - resized.shape[-2]))
        rows, cols = canvas_h // tile, canvas_w // tile
        tiles = self._normalize(canvas).reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, tile, tile)
        if rows * cols > 1:
            whole = self._normalize(resize_uint8(pixels, tile, tile, mode))
            tiles = torch.cat([tiles, whole[None]])
        return np.ascontiguousarray(tiles.numpy(), dtype=np.float32), (rows, cols)


class Llama4ImageProcessor(ImagePromptProcessor):
    max_images_per_prompt = 10  # Llama 4 was trained with up to 5 images; vLLM's default limit is 10

    def __init__(self, preprocessing: Llama4Preprocessing, token_ids: dict[str, int], tokens_per_tile: int,
                 unavailable: str | None = None) -> None:
        self.preprocessing, self.tokens_per_tile = preprocessing, tokens_per_tile
        self.unavailable = unavailable  # why this checkpoint cannot take images (it still serves text)
        self.image_token_id, self.prompt_token_id = token_ids["<|patch|>"], token_ids["<|image|>"]
        self.start_id, self.end_id = token_ids["<|image_start|>"], token_ids["<|image_end|>"]
        self.x_sep_id, self.y_sep_id = token_ids["<|tile_x_separator|>"], token_ids["<|tile_y_separator|>"]

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, preprocessor_config: dict[str, Any], tokenizer: "Tokenizer"
                        ) -> "Llama4ImageProcessor":
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        preprocessing = Llama4Preprocessing.from_config(preprocessor_config)
        token_ids = {token: tokenizer.backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, token_id in token_ids.items() if token_id is None]
        if missing:  # a text-only use of the checkpoint still works; an image is refused
            return cls(preprocessing, {token: -1 for token in SPECIAL_TOKENS}, 0,
                       f"this Llama 4 checkpoint's tokenizer lacks the image tokens {', '.join(missing)}")
        patch_id = int(hf.get("image_token_index", hf.get("image_token_id", token_ids["<|patch|>"])))
        if patch_id != token_ids["<|patch|>"]:
            raise ValueError(f"config.json: image_token_index {patch_id} is not the tokenizer's <|patch|> "
                             f"({token_ids['<|patch|>']})")
        patch_size = int(vision.get("patch_size", 14))
        shuffle = float(vision.get("pixel_shuffle_ratio", 0.5))
        side = preprocessing.tile_size // patch_size
        tokens_per_tile = side * side // int(round(1.0 / shuffle**2))
        return cls(preprocessing, token_ids, tokens_per_tile)

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], list[ImageInput]]:
        if self.unavailable is not None:
            raise ValueError(self.unavailable)
        return super().process(token_ids, images)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """-> [tiles (+1 global), 3, tile, tile] float32."""
        return self.preprocessing(image)[0]

    def num_image_tokens(self, pixel_values: np.ndarray) -> int:
        return self.tokens_per_tile * pixel_values.shape[0]

    def prompt_tokens(self, grid: tuple[int, int]) -> list[int]:
        """What one `<|image|>` becomes for an image cut into rows x cols tiles (Llama4Processor's string)."""
        rows, cols = grid
        patches = [self.image_token_id] * self.tokens_per_tile
        tokens = [self.start_id]
        if rows * cols > 1:
            for _ in range(rows):
                for col in range(cols):
                    tokens += patches + ([self.x_sep_id] if col < cols - 1 else [])
                tokens.append(self.y_sep_id)
        return tokens + [self.prompt_token_id, *patches, self.end_id]

    def expand(self, image: Image.Image) -> tuple[list[int], list[np.ndarray]]:
        """-> (the tokens, one tile's pixel values [3, tile, tile] per run of <|patch|>: the tiles, then the global
        one)."""
        pixel_values, grid = self.preprocessing(image)
        return self.prompt_tokens(grid), list(pixel_values)
