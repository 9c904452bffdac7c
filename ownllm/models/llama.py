"""LlamaForCausalLM (Llama 2, 3, 3.1, 3.2, 3.3): pre-norm decoder, grouped-query attention, SwiGLU MLP.

The decoder here is parameterized by three class attributes, so Mistral, Qwen2 and Qwen3 are
small subclasses in their own files: `qkv_bias` / `o_bias` (None: follow config.attention_bias)
and `qk_norm` (per-head RMSNorm on q and k before RoPE).
"""

from __future__ import annotations

import torch
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import Attention, AttentionMetadata
from ownllm.layers.decode_stack import DecodeStack
from ownllm.layers.linear import fuse_linears
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.module import Module
from ownllm.layers.norm import RMSNorm
from ownllm.layers.parallel import attention_projections, lm_head, vocab_embedding
from ownllm.layers.rotary import RotaryEmbedding
from ownllm.models.base import CausalLM


class LlamaAttention(Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads, self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, self.head_dim, qkv_bias, o_bias)
        if qk_norm:
            self.q_norm = norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, layer_idx, window)

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

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        # x: [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = self._qkv(x)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(meta.positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaDecoderLayer(Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, o_bias, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        qkv_bias = config.attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = config.attention_bias if self.o_bias is None else self.o_bias
        self.model = LlamaModel(config, qkv_bias, o_bias, self.qk_norm)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def post_load(self) -> None:
        super().post_load()
        self.decode_stack = DecodeStack.build(self)  # None unless every layer is the plain Llama decoder layer
