"""Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL's vision transformer (models/qwen2_5_vl_vision.py) and a Qwen2
decoder whose rotary positions are three-dimensional (M-RoPE).

The decoder is Qwen2ForCausalLM's; only its rope differs (layers/rotary.py MultimodalRotaryEmbedding, split by the
config's mrope_section). A prompt's 3D positions come from its images (multimodal/qwen2_5_vl.py mrope_positions,
which the runner asks for through `mrope_positions` when a request with images arrives) and reach the layers as
AttentionMetadata.mrope_positions [3, T]; a step none of whose requests has images leaves it None and runs exactly
the text model's path (the same position on all three axes is plain RoPE).

An image's pixel values (Qwen2VLPreprocessing's [t, rows / merge, columns / merge, merge, merge, patch] array) go
through the tower, one row per merged patch block, and replace the image's `<|image_pad|>` embeddings.
Checkpoints name the parts the transformers v5 way (`model.language_model.*`, `model.visual.*`, `lm_head.weight`)
or the v4 way (`model.*`, `visual.*`, `lm_head.weight`); both load.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata
from ownllm.layers.rotary import MultimodalRotaryEmbedding
from ownllm.models.base import RenamedTensors
from ownllm.models.qwen2 import Qwen2ForCausalLM
from ownllm.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer
from ownllm.multimodal import ImageInput
from ownllm.multimodal.qwen2_5_vl import image_grid, mrope_positions


def checkpoint_names(name: str) -> list[str]:
    """Where Qwen2.5-VL checkpoints keep our parameter `name`, v5 layout first."""
    part, _, rest = name.partition(".")
    if part == "model":
        return [f"model.language_model.{rest}", name]
    if part == "visual":
        return [f"model.{name}", name]
    return [name]


def mrope_section(hf: Mapping) -> list[int]:
    """v5 keeps it in rope_parameters, v4 in rope_scaling ({"type": "mrope", "mrope_section": [...]})."""
    section = (hf.get("rope_parameters") or {}).get("mrope_section") or (hf.get("rope_scaling") or {}).get(
        "mrope_section")
    if not section:
        raise ValueError("config.json: Qwen2.5-VL needs rope_parameters.mrope_section (or rope_scaling.mrope_section)")
    return [int(s) for s in section]


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = config.hf_config
        self.rope = MultimodalRotaryEmbedding(config.head_dim, config.rope_theta, mrope_section(hf))
        self.visual = Qwen2_5_VisionTransformer(hf.get("vision_config") or {}, config.architecture)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().load_weights(RenamedTensors(tensors, checkpoint_names), dtype)

    def post_load(self) -> None:
        self.visual.post_load()
        super().post_load()

    def mrope_positions(self, num_prompt_tokens: int, images: Sequence[ImageInput]) -> tuple[np.ndarray, int]:
        """A prompt with images -> its 3D positions [3, num_prompt_tokens] and the delta of the tokens after it."""
        return mrope_positions(num_prompt_tokens, images)

    def rope_for(self, meta: AttentionMetadata):
        """Rotates by meta.mrope_positions where the step has them."""
        return self.rope if meta.mrope_positions is None else self.rope.at(meta.mrope_positions)

    def embed_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's [t, rows / merge, columns / merge, merge, merge, patch] pixel values -> [t * rows * columns /
        merge**2, hidden_size]."""
        return [self.visual(pixels.reshape(-1, pixels.shape[-1]), image_grid(pixels.shape)) for pixels in pixel_values]
