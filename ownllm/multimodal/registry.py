"""Maps a config.json "architectures" name to its image processor (ownllm.multimodal.ImagePromptProcessor),
imported lazily. An architecture not listed takes no images."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ownllm.loader import Checkpoint
    from ownllm.multimodal import ImagePromptProcessor

_PROCESSORS = {
    "LlavaForConditionalGeneration": ("llava", "LlavaImageProcessor"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ImageProcessor"),
    "Llama4ForConditionalGeneration": ("llama4", "Llama4ImageProcessor"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLImageProcessor"),
}


def takes_images(architecture: str) -> bool:
    return architecture in _PROCESSORS


def image_processor(checkpoint: "Checkpoint", max_images_per_prompt: int | None = None
                    ) -> "ImagePromptProcessor | None":
    """The model's image processor, or None for a model without a vision tower. max_images_per_prompt: the limit a
    prompt's images are held to (None: the architecture's own)."""
    config = checkpoint.config
    if config.architecture not in _PROCESSORS:
        return None
    module, name = _PROCESSORS[config.architecture]
    cls = getattr(importlib.import_module(f"ownllm.multimodal.{module}"), name)
    processor = cls.from_checkpoint(config, checkpoint.preprocessor_config, checkpoint.tokenizer)
    if max_images_per_prompt is not None:
        processor.max_images_per_prompt = max_images_per_prompt
    return processor
