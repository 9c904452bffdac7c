"""Gemma 3's image side: its preprocessing (Gemma3ImageProcessor: convert to RGB, resize to a fixed square with
Pillow's bilinear filter, rescale, normalize with mean = std = 0.5; no crop) and its prompt form, as Gemma3Processor
writes it: each `<start_of_image>` the chat template puts in the prompt becomes
"\\n\\n<start_of_image>" + mm_tokens_per_image x `<image_soft_token>` + "<end_of_image>\\n\\n".
Pan and scan (extra crops of wide images, off by default) is not supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ownllm.config import ModelConfig
from ownllm.multimodal import ImagePromptProcessor
from ownllm.multimodal.image_processing import ClipImageProcessor

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

# Gemma3ImageProcessor's class defaults; the checkpoints' preprocessor_config.json sets 896 x 896
DEFAULTS = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def gemma3_preprocessing(config: dict[str, Any]) -> ClipImageProcessor:
    """A preprocessor_config.json of Gemma3ImageProcessor -> our preprocessing with the same steps."""
    if config.get("do_pan_and_scan"):
        raise ValueError("preprocessor_config.json: do_pan_and_scan is not supported for Gemma 3")
    settings = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}, "do_center_crop": False}
    if isinstance(settings["size"], int):
        settings["size"] = {"height": settings["size"], "width": settings["size"]}
    return ClipImageProcessor.from_config(settings)


class Gemma3ImageProcessor(ImagePromptProcessor):
    bidirectional = True  # transformers' token_type_ids mask: an image's tokens see each other both ways
    def __init__(self, preprocessing: ClipImageProcessor, image_token_id: int, boi_token_id: int, eoi_token_id: int,
                 tokens_per_image: int, newlines: list[int]) -> None:
        self.preprocessing = preprocessing
        self.image_token_id, self.prompt_token_id = image_token_id, boi_token_id
        self.eoi_token_id, self.tokens_per_image, self.newlines = eoi_token_id, tokens_per_image, newlines

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, preprocessor_config: dict[str, Any], tokenizer: "Tokenizer"
                        ) -> "Gemma3ImageProcessor":
        hf = config.hf_config
        image_size = int((hf.get("vision_config") or {}).get("image_size", 224))
        preprocessing = gemma3_preprocessing({"size": {"height": image_size, "width": image_size},
                                              **preprocessor_config})
        newlines = tokenizer.encode("\n\n", add_special_tokens=False)
        return cls(preprocessing, int(hf.get("image_token_index", 262144)), int(hf.get("boi_token_index", 255999)),
                   int(hf.get("eoi_token_index", 256000)), int(hf.get("mm_tokens_per_image", 256)), newlines)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.preprocessing(image)

    def num_image_tokens(self, pixel_values: np.ndarray) -> int:
        return self.tokens_per_image

    def replacement(self, num_tokens: int) -> list[int]:
        return [*self.newlines, self.prompt_token_id, *[self.image_token_id] * num_tokens, self.eoi_token_id,
                *self.newlines]
