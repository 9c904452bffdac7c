"""LlavaForConditionalGeneration: a CLIP vision tower, a two-layer MLP projector, and a Llama or Mistral decoder.

An image's pixel values go through the tower (models/clip_vision.py); the hidden state(s) `vision_feature_layer`
names (an int or a list, concatenated) are taken, without the CLS position when vision_feature_select_strategy is
"default", and projected (linear_1, projector_hidden_act, linear_2) to one row per placeholder token; the runner
writes those rows over the placeholders' input embeddings. The text decoder is LlamaForCausalLM's.

Checkpoints name the parts either the older way (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*` or `vision_tower.*`, `multi_modal_projector.*`) or the newer one (`model.language_model.*`,
`lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`); both load.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ownllm.config import ModelConfig
from ownllm.layers.linear import Linear
from ownllm.layers.module import Module
from ownllm.models.base import RenamedTensors
from ownllm.models.clip_vision import ClipVisionModel, activation
from ownllm.models.llama import LlamaForCausalLM


class LlavaMultiModalProjector(Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def checkpoint_names(name: str) -> list[str]:
    """Where LLaVA checkpoints keep our parameter `name`, older layout first."""
    part, _, rest = name.partition(".")
    if part == "model":
        return [f"language_model.model.{rest}", f"model.language_model.{rest}"]
    if part == "lm_head":
        return [f"language_model.{name}", name]
    if part == "vision_tower":
        return [f"vision_tower.vision_model.{rest}", name, f"model.vision_tower.vision_model.{rest}", f"model.{name}"]
    return [name, f"model.{name}"]


class LlavaForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"LLaVA with a {vision.get('model_type')!r} vision tower is not supported (CLIP only)")
        layer = hf.get("vision_feature_layer", -2)
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.drops_cls = hf.get("vision_feature_select_strategy", "default") == "default"
        self.vision_tower = ClipVisionModel(vision)
        self.multi_modal_projector = LlavaMultiModalProjector(
            int(vision.get("hidden_size", 1024)) * len(self.feature_layers), config.hidden_size,
            str(hf.get("projector_hidden_act", "gelu")), bool(hf.get("multimodal_projector_bias", True)))

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().load_weights(RenamedTensors(tensors, checkpoint_names), dtype)

    def embed_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] per image (all one size, as CLIP preprocessing makes them) -> [patches (+1), hidden] each."""
        states = self.vision_tower.hidden_states(torch.stack(pixel_values), self.feature_layers)
        if self.drops_cls:
            states = [s[:, 1:] for s in states]
        features = self.multi_modal_projector(torch.cat(states, dim=-1))  # [B, rows, hidden]
        return list(features.unbind(0))
