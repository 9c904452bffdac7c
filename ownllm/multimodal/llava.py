"""LLaVA's image side: CLIP preprocessing from preprocessor_config.json (or an mmproj file's settings), and one `<image>` token in the prompt
expanded to one placeholder per patch (plus the CLS position when vision_feature_select_strategy is "full"),
as LlavaProcessor does."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ownllm.config import ModelConfig
from ownllm.multimodal import ImagePromptProcessor
from ownllm.multimodal.image_processing import ClipImageProcessor


class LlavaImageProcessor(ImagePromptProcessor):
    def __init__(self, clip: ClipImageProcessor, image_token_id: int, patch_size: int, keeps_cls: bool) -> None:
        self.clip = clip
        self.image_token_id = image_token_id
        self.patch_size = patch_size
        self.keeps_cls = keeps_cls

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, preprocessor_config: dict[str, Any], tokenizer=None
                        ) -> "LlavaImageProcessor":
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        image_size = int(vision.get("image_size", 224))
        if preprocessor_config:
            clip = ClipImageProcessor.from_config(preprocessor_config)
        else:
            clip = ClipImageProcessor({"shortest_edge": image_size}, {"height": image_size, "width": image_size})
        token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
        return cls(clip, int(token_id), int(vision.get("patch_size", 14)),
                   hf.get("vision_feature_select_strategy", "default") == "full")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.clip(image)

    def num_image_tokens(self, pixel_values: np.ndarray) -> int:
        height, width = pixel_values.shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size) + int(self.keeps_cls)
