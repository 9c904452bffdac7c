"""Gemma3ForCausalLM (Gemma 3 text: 270M, 1B, and the language model of the multimodal sizes).

What differs from Llama (transformers' modeling_gemma3.py):
- Embeddings scaled by sqrt(hidden_size), rounded to the model dtype first (55.4256 is 55.5 in bfloat16).
- RMSNorm scales by (1 + weight) (layers/norm.py GemmaRMSNorm), on q and k per head too; four norms per layer:
  x += post_attention_layernorm(attn(input_layernorm(x))); x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))).
- GeGLU MLP (gelu_pytorch_tanh).
- Interleaved local and global layers (config.layer_types): local ones attend within `sliding_window` and rotate
  with their own rope (config.sliding_rope: `rope_local_base_freq`, no scaling); global ones use rope_theta and
  rope_scaling.
- Attention scale query_pre_attn_scalar**-0.5; tanh soft-capping of the final logits where the config sets it;
  embeddings tied to the lm_head. A config's attn_logit_softcapping is ignored, as transformers' Gemma 3 and
  llama.cpp's gemma3 ignore it (Gemma 2 capped attention scores; Gemma 3 replaced that with q/k norms).
"""

from __future__ import annotations

import torch
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear
from ownllm.layers.mlp import GatedMLP, activation
from ownllm.layers.module import Module
from ownllm.layers.norm import GemmaRMSNorm
from ownllm.layers.rotary import RotaryEmbedding
from ownllm.models.base import CausalLM
from ownllm.models.llama import LlamaAttention


class Gemma3DecoderLayer(Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(config, layer_idx, config.attention_bias, config.attention_bias,
                                        qk_norm=True, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, config.intermediate_size, act=config.hidden_act)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        # x: [T, hidden]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), meta, rope))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.hf_config.get("use_bidirectional_attention"):
            raise ValueError("config.json: use_bidirectional_attention (an embedding model) is not supported for "
                             f"{config.architecture}")
        activation(config.hidden_act, config.architecture)  # a clear error for an unknown one
        self.model = Gemma3TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.local_rope = RotaryEmbedding(config.head_dim, *config.sliding_rope) if config.sliding_rope else self.rope
        # sqrt(hidden_size) in the model dtype, as transformers' Gemma3TextScaledWordEmbedding multiplies
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, device="cpu").to(getattr(torch, config.dtype)))

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def post_load(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        super().post_load()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> scaled token embeddings [T, hidden_size]."""
        return self.model.embed_tokens(input_ids) * self.embed_scale

    def hidden_states(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.decode(self.embed(input_ids), meta)

    def decode(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: input embeddings [T, hidden_size] -> the last layer's outputs [T, hidden_size]."""
        for layer in self.model.layers:
            x = layer(x, meta, self.local_rope if layer.is_sliding else self.rope)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab_size]
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
