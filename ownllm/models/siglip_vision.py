"""SigLIP's vision transformer (SiglipVisionModel without its pooling head), as Gemma 3 uses it: pixel values -> the
last hidden state, one row per patch.

Patch embedding (a strided convolution with bias) plus learned position embeddings, no class token and no pre-norm;
CLIP's pre-norm encoder layers (models/clip_vision.py: biased q/k/v/out projections, full bidirectional attention, an
MLP, here gelu_pytorch_tanh); a final `post_layernorm`. Images are the tower's own image_size (Gemma 3's preprocessing
resizes to it), so the position embeddings are never interpolated. Parameter names are SiglipVisionModel's.
"""

from __future__ import annotations

import torch
from torch import nn

from ownllm.layers.module import Module
from ownllm.models.clip_vision import ClipEncoder, ClipEncoderLayer


class SiglipVisionEmbeddings(Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int, num_channels: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(num_channels, hidden, patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] -> [B, patches, hidden]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, hidden, h, w]
        patches = patches.flatten(2).transpose(1, 2)
        if patches.shape[1] != self.position_embedding.weight.shape[0]:
            raise ValueError(f"an image of {patches.shape[1]} patches does not fit the vision tower's "
                             f"{self.position_embedding.weight.shape[0]} positions")
        return patches + self.position_embedding.weight


class SiglipVisionModel(Module):
    """vision_config: the checkpoint's `vision_config` dict (SiglipVisionConfig's keys and defaults)."""

    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        c = vision_config
        hidden = int(c.get("hidden_size", 768))
        eps = float(c.get("layer_norm_eps", 1e-6))
        self.image_size, self.patch_size = int(c.get("image_size", 224)), int(c.get("patch_size", 16))
        self.embeddings = SiglipVisionEmbeddings(hidden, self.image_size, self.patch_size, int(c.get("num_channels", 3)))
        self.encoder = ClipEncoder([
            ClipEncoderLayer(hidden, int(c.get("intermediate_size", 3072)), int(c.get("num_attention_heads", 12)), eps,
                             str(c.get("hidden_act", "gelu_pytorch_tanh")))
            for _ in range(int(c.get("num_hidden_layers", 12)))
        ])
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [B, C, image_size, image_size] -> last hidden state [B, patches, hidden]."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
