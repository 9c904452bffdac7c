"""Llama4ForCausalLM (text) and Llama4ForConditionalGeneration (the same decoder with Llama 4's vision tower).

What differs from Llama 3:
- Feed-forward: MoE on layers `moe_layers` (default every `interleave_moe_layer_step`-th), dense SwiGLU of
  `intermediate_size_mlp` between. The MoE routes top-1 by raw logit, scales the chosen expert's *input*
  by the sigmoid of its logit, and always adds a shared expert. Experts are stored fused:
  `feed_forward.experts.gate_up_proj` [E, H, 2I] and `.down_proj` [E, I, H]; each expert takes
  transposed views of them (no copy).
- Attention: RoPE over interleaved pairs (complex form) on the layers `no_rope_layers` marks with 1; those
  layers attend only within their aligned `attention_chunk_size` chunk and, with `use_qk_norm`, L2-normalize
  q and k after RoPE. The other (NoPE) layers attend the full causal context and, with
  `attn_temperature_tuning`, scale q by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
The conditional-generation checkpoint names the text weights `language_model.model.*` and
`language_model.lm_head.weight`, the tower `vision_model.*` (models/llama4_vision.py) and the projector
`multi_modal_projector.linear_1.weight` (vision_output_dim -> hidden_size, no bias). embed_images: one tile
[3, 336, 336] per call item (multimodal/llama4.py makes each tile's run of <|patch|> tokens an ImageInput) ->
tower -> projector -> [tokens_per_tile, hidden_size], the rows that replace the <|patch|> embeddings.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import Attention, AttentionMetadata
from ownllm.layers.linear import Linear, fuse_linears
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.module import Module
from ownllm.layers.moe import ExpertTensors, Experts, check_moe_config, sigmoid_topk
from ownllm.layers.norm import RMSNorm
from ownllm.layers.parallel import attention_projections, lm_head, vocab_embedding
from ownllm.layers.rotary import InterleavedRotaryEmbedding
from ownllm.models.base import CausalLM
from ownllm.models.llama4_vision import Llama4VisionModel


def uses_rope(config: ModelConfig, layer_idx: int) -> bool:
    hf = config.hf_config
    flags = hf.get("no_rope_layers")
    if flags:
        return bool(flags[layer_idx])
    return (layer_idx + 1) % int(hf.get("no_rope_layer_interval", 4)) != 0


def moe_layers(config: ModelConfig) -> set[int]:
    hf = config.hf_config
    if hf.get("moe_layers") is not None:
        return set(hf["moe_layers"])
    step = int(hf.get("interleave_moe_layer_step", 1))
    return set(range(step - 1, config.num_hidden_layers, step))


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., head_dim]; RMS-normalized in float32, no weight (transformers' Llama4TextL2Norm)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Llama4Attention(Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hf = config.hf_config
        self.head_dim, bias = config.head_dim, config.attention_bias
        self.num_heads, self.num_kv_heads, self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, self.head_dim, bias, bias)
        self.use_rope = uses_rope(config, layer_idx)
        self.qk_norm_eps = config.rms_norm_eps if (self.use_rope and hf.get("use_qk_norm", True)) else None
        self.temperature_tuning = not self.use_rope and bool(hf.get("attn_temperature_tuning", True))
        self.floor_scale, self.attn_scale = float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1))
        args = (self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_idx)
        chunk = hf.get("attention_chunk_size")
        self.attn = Attention(*args, chunk_size=int(chunk) if self.use_rope and chunk else None)

    def fuse(self) -> None:
        """After loading: one qkv matmul instead of three."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: InterleavedRotaryEmbedding) -> torch.Tensor:
        # x: [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = self._qkv(x)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = rope(meta.positions, q, k)
        if self.qk_norm_eps is not None:
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature_tuning:
            scale = torch.log1p(torch.floor((meta.positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)  # scale: [T]
        return self.o_proj(self.attn(q, k, v, meta))


class Llama4Moe(Module):
    """router -> top-k sigmoid weights scaling the experts' input, plus the always-on shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        num_experts = int(hf["num_local_experts"])
        self.top_k = int(hf.get("num_experts_per_tok", 1))
        self.router = Linear(config.hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, config.hidden_size, config.intermediate_size, scale_input=True)
        self.shared_expert = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        weights, ids = sigmoid_topk(self.router(x), self.top_k)
        return self.shared_expert(x) + self.experts(x, weights, ids)


class Llama4DecoderLayer(Module):
    def __init__(self, config: ModelConfig, layer_idx: int, is_moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Llama4Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        width = int(config.hf_config.get("intermediate_size_mlp") or config.intermediate_size)
        self.feed_forward = Llama4Moe(config) if is_moe else GatedMLP(config.hidden_size, width)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: InterleavedRotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, rope)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4Model(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        sparse = moe_layers(config)
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Llama4DecoderLayer(config, i, i in sparse) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(CausalLM):
    checkpoint_prefix = ""  # where the text model's names start in the checkpoint

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        check_moe_config(config)
        self.model = Llama4Model(config)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.rope = InterleavedRotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def checkpoint_name(self, name: str) -> str:
        """Where the checkpoint keeps our parameter `name`."""
        return self.checkpoint_prefix + name

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().load_weights(ExpertTensors(tensors, rename=self.checkpoint_name), dtype)

    def fuse_projections(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.fuse()
            ffn = layer.feed_forward
            (ffn.shared_expert if isinstance(ffn, Llama4Moe) else ffn).fuse()


class Llama4MultiModalProjector(Module):
    def __init__(self, vision_output_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = Linear(vision_output_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(Llama4ForCausalLM):
    checkpoint_prefix = "language_model."
    _VISION_PARTS = ("vision_model.", "multi_modal_projector.")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        if vision.get("model_type", "llama4_vision_model") != "llama4_vision_model":
            raise ValueError(f"Llama 4 with a {vision.get('model_type')!r} vision tower is not supported")
        self.vision_model = Llama4VisionModel(vision)
        self.multi_modal_projector = Llama4MultiModalProjector(int(vision.get("vision_output_dim", 7680)),
                                                               config.hidden_size)

    def checkpoint_name(self, name: str) -> str:
        return name if name.startswith(self._VISION_PARTS) else self.checkpoint_prefix + name

    def embed_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tile [3, H, W] each (multimodal/llama4.py) -> [tokens_per_tile, hidden_size] each."""
        return list(self.multi_modal_projector(self.vision_model(torch.stack(pixel_values))).unbind(0))
