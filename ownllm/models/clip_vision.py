"""CLIP's vision transformer (CLIPVisionModel) as LLaVA uses it: pixel values -> the hidden states of chosen layers.

Patch embedding (a strided convolution without bias), a learned CLS token and position embeddings, a LayerNorm
transformers spells `pre_layrnorm`, then pre-norm encoder layers (biased q/k/v/out projections, full
bidirectional attention, an MLP with quick_gelu or gelu). Hidden state 0 is the pre-norm's output and hidden state
i the output of layer i - 1, as transformers' `hidden_states` counts them; layers past the last one asked for are
not run. Parameter names are CLIPVisionTransformer's, so a checkpoint loads by name; its post_layernorm, which LLaVA
never reads (and llama.cpp's mmproj files leave out), is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.layers.linear import Linear
from ownllm.layers.module import Module

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


class ClipVisionEmbeddings(Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int, num_channels: int) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(num_channels, hidden, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] -> [B, 1 + patches, hidden]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, hidden, h, w]
        patches = patches.flatten(2).transpose(1, 2)  # [B, patches, hidden]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding.weight[: x.shape[1]]


class ClipAttention(Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = Linear(hidden, hidden)
        self.k_proj = Linear(hidden, hidden)
        self.v_proj = Linear(hidden, hidden)
        self.out_proj = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, hidden]
        batch, num, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # -> [B, heads, N, head_dim]
            return t.reshape(batch, num, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, num, hidden))


class ClipMLP(Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.fc1 = Linear(hidden, intermediate)
        self.fc2 = Linear(intermediate, hidden)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int, eps: float, act: str) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = ClipAttention(hidden, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ClipMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(Module):
    def __init__(self, layers: list[ClipEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ClipVisionModel(Module):
    """vision_config: the checkpoint's `vision_config` dict (CLIPVisionConfig's keys)."""

    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        c = vision_config
        hidden = int(c.get("hidden_size", 768))
        eps = float(c.get("layer_norm_eps", 1e-5))
        self.embeddings = ClipVisionEmbeddings(hidden, int(c.get("image_size", 224)), int(c.get("patch_size", 32)),
                                               int(c.get("num_channels", 3)))
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = ClipEncoder([
            ClipEncoderLayer(hidden, int(c.get("intermediate_size", 3072)), int(c.get("num_attention_heads", 12)), eps,
                             str(c.get("hidden_act", "quick_gelu")))
            for _ in range(int(c.get("num_hidden_layers", 12)))
        ])
        self.num_layers = len(self.encoder.layers)

    def hidden_states(self, pixel_values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """pixel_values: [B, C, H, W] -> the hidden states [B, 1 + patches, hidden] at `indices` (negative ones
        count from the end of the num_layers + 1 states)."""
        wanted = [i % (self.num_layers + 1) for i in indices]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for index in range(1, max(wanted) + 1):
            x = self.encoder.layers[index - 1](x)
            states[index] = x
        return [states[i] for i in wanted]
