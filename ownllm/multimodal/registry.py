"""Maps a config.json "architectures" name to its image processor (ownllm.multimodal.ImagePromptProcessor),
imported lazily. An architecture not listed takes no images."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ownllm.config import ModelConfig
    from ownllm.multimodal import ImagePromptProcessor

_PROCESSORS = {
    "LlavaForConditionalGeneration": ("llava", "LlavaImageProcessor"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ImageProcessor"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLImageProcessor"),
}


def takes_images(architecture: str) -> bool:
    return architecture in _PROCESSORS


def image_processor(config: "ModelConfig", folder: Path | None) -> "ImagePromptProcessor | None":
    """The model's image processor, or None for a model without a vision tower."""
    if config.architecture not in _PROCESSORS:
        return None
    module, name = _PROCESSORS[config.architecture]
    cls = getattr(importlib.import_module(f"ownllm.multimodal.{module}"), name)
    return cls.from_checkpoint(config, folder)
