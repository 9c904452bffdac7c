"""Llama 4's vision tower (transformers' Llama4VisionModel): one tile's pixel values -> its rows for the projector.

- Patch embedding: unfold into patch_size x patch_size patches (channel, row, column order) and one linear map
  without bias; a learned class embedding appended *after* the patches; learned positions; `layernorm_pre`.
- Encoder layers: pre-norm (LayerNorm), biased q/k/v/o attention over all the tile's positions (no mask) with a 2D
  rotary embedding (below), an MLP fc1 -> exact GELU -> fc2 with biases.
- `layernorm_post`, the class position dropped, then the vision adapter: pixel shuffle (each 2 x 2 block of patches,
  for the usual ratio 0.5, folded into one row of 4x the width) and an MLP fc1 -> GELU -> fc2 -> GELU without biases.

2D RoPE: the head's dimensions are complex pairs (interleaved, as Llama 4's text rope); the first quarter of them
rotate by (column + 1) x freq, the second by (row + 1) x freq, freq_i = theta^(-4i / head_dim) for i < head_dim / 4;
the class position does not rotate. LayerNorms use eps 1e-5 whatever the config says, as transformers' do.
Parameter names are Llama4VisionModel's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.layers.linear import Linear
from ownllm.layers.module import Module

LAYER_NORM_EPS = 1e-5  # transformers' Llama4VisionModel builds nn.LayerNorm(hidden) and ignores norm_eps


def vision_rope(grid: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (cos, sin) [grid * grid + 1, head_dim / 2], the last row (the class position) the identity."""
    if head_dim % 4:
        raise ValueError(f"Llama 4's vision rope needs a head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (2 * quarter)))  # [head_dim / 4]
    index = torch.arange(grid * grid, dtype=torch.int32)
    cols, rows = (index % grid + 1)[:, None], (index // grid + 1)[:, None]
    angles = torch.cat([cols * freqs, rows * freqs], dim=-1).float()  # [patches, head_dim / 2]
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1])])
    return torch.cos(angles), torch.sin(angles)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, N, heads, head_dim], its (even, odd) dimensions complex pairs; cos, sin: [N, head_dim / 2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # [N, 1, head_dim / 2]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Llama4UnfoldConvolution(Module):
    def __init__(self, num_channels: int, patch_size: int, hidden: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.linear = Linear(num_channels * patch_size * patch_size, hidden, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] -> [B, patches, hidden]
        patches = F.unfold(pixel_values, self.patch_size, stride=self.patch_size)  # [B, C * p * p, patches]
        return self.linear(patches.transpose(1, 2))


class Llama4VisionAttention(Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = Linear(hidden, hidden)
        self.k_proj = Linear(hidden, hidden)
        self.v_proj = Linear(hidden, hidden)
        self.o_proj = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, N, hidden]
        batch, num, hidden = x.shape
        shape = (batch, num, self.num_heads, self.head_dim)
        q = rotate_pairs(self.q_proj(x).reshape(shape), cos, sin)
        k = rotate_pairs(self.k_proj(x).reshape(shape), cos, sin)
        v = self.v_proj(x).reshape(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=self.head_dim**-0.5)  # [B, heads, N, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, num, hidden))


class Llama4VisionMLP(Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = Linear(hidden, intermediate)
        self.fc2 = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Llama4VisionEncoderLayer(Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.self_attn = Llama4VisionAttention(hidden, num_heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.mlp = Llama4VisionMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4VisionEncoder(Module):
    def __init__(self, layers: list[Llama4VisionEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """x: [B, side * side, C] -> [B, (side * ratio)^2, C / ratio^2]: each (1 / ratio) x (1 / ratio) block of
    positions becomes one, its rows side by side (transformers' pixel_shuffle, step for step)."""
    batch, num, channels = x.shape
    side = int(math.sqrt(num))
    x = x.reshape(batch, side, int(side * ratio), int(channels / ratio))  # fold columns into channels
    x = x.permute(0, 2, 1, 3).reshape(batch, int(side * ratio), int(side * ratio), int(channels / ratio**2))
    return x.permute(0, 2, 1, 3).reshape(batch, -1, int(channels / ratio**2))


class Llama4VisionMLP2(Module):
    """The vision adapter's MLP: fc1 -> GELU -> fc2 -> GELU, no biases."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden, bias=False)
        self.fc2 = Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class Llama4VisionPixelShuffleMLP(Module):
    def __init__(self, ratio: float, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.mlp = Llama4VisionMLP2(in_features, hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class Llama4VisionModel(Module):
    """vision_config: the checkpoint's `vision_config` dict (Llama4VisionConfig's keys and defaults)."""

    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        c = vision_config
        hidden, heads = int(c.get("hidden_size", 768)), int(c.get("num_attention_heads", 16))
        intermediate = int(c.get("intermediate_size", 5632))
        self.image_size, self.patch_size = int(c.get("image_size", 448)), int(c.get("patch_size", 14))
        self.ratio = float(c.get("pixel_shuffle_ratio", 0.5))
        self.grid = self.image_size // self.patch_size
        rope = c.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        self.patch_embedding = Llama4UnfoldConvolution(int(c.get("num_channels", 3)), self.patch_size, hidden)
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(self.grid**2 + 1, hidden))
        self.layernorm_pre = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.model = Llama4VisionEncoder([Llama4VisionEncoderLayer(hidden, intermediate, heads)
                                          for _ in range(int(c.get("num_hidden_layers", 34)))])
        self.vision_adapter = Llama4VisionPixelShuffleMLP(self.ratio, intermediate,
                                                          int(c.get("projector_input_dim", 4096)),
                                                          int(c.get("projector_output_dim", 4096)))
        self.rope_settings = (self.grid, hidden // heads, theta)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), made on the first tile's device
        self.shuffled_width = int(hidden / self.ratio**2)
        self.tokens_per_tile = int(self.grid * self.ratio) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [tiles, C, image_size, image_size] -> [tiles, tokens_per_tile, projector_output_dim]."""
        size = tuple(pixel_values.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise ValueError(f"a tile of {size[0]}x{size[1]} pixels does not fit the vision tower's "
                             f"{self.image_size}x{self.image_size}")
        if self.vision_adapter.mlp.fc1.in_features != self.shuffled_width:
            raise ValueError(f"vision_config: intermediate_size {self.vision_adapter.mlp.fc1.in_features} is not "
                             f"hidden_size / pixel_shuffle_ratio^2 = {self.shuffled_width}")
        x = self.patch_embedding(pixel_values.to(self.positional_embedding_vlm.dtype))  # [tiles, patches, hidden]
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)
        x = self.layernorm_pre(x + self.positional_embedding_vlm)
        if self._rope is None or self._rope[0].device != x.device:
            with torch.device("cpu"):  # the model is built on the meta device
                self._rope = tuple(t.to(x.device) for t in vision_rope(*self.rope_settings))
        cos, sin = self._rope
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.layernorm_post(x)[:, :-1]  # the class position dropped
        return self.vision_adapter(x)
