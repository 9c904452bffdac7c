"""MixtralForCausalLM: the Mistral decoder (GQA, rotate_half RoPE, optional sliding window) with a sparse
MoE feed-forward in every layer: softmax router, top-k (2) experts renormalized to sum 1, no shared expert.

Checkpoints store each expert as `block_sparse_moe.experts.<e>.w1/w3/w2.weight` (gate/up/down); each
expert adopts its tensors as they are (layers/moe.py ExpertTensors renames them).
Qwen3-MoE is a subclass (qwen3_moe.py): the class attributes below say where the two differ.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata
from ownllm.layers.linear import Linear
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.module import Module
from ownllm.layers.moe import ExpertTensors, Experts, check_moe_config, softmax_topk
from ownllm.layers.norm import RMSNorm
from ownllm.layers.parallel import lm_head, vocab_embedding
from ownllm.layers.rotary import RotaryEmbedding
from ownllm.models.base import CausalLM
from ownllm.models.llama import LlamaAttention


def num_experts(config: ModelConfig) -> int:
    """Mixtral's `num_local_experts`; Qwen3-MoE checkpoints write `num_experts` (transformers 5 saves either)."""
    hf = config.hf_config
    return int(hf.get("num_local_experts") or hf.get("num_experts") or 0)


class MixtralSparseMoeBlock(Module):
    """Softmax router (`gate`) over Experts; Mixtral always renormalizes the top-k, Qwen3-MoE if asked."""

    def __init__(self, config: ModelConfig, renormalize: bool) -> None:
        super().__init__()
        hf = config.hf_config
        self.top_k = int(hf.get("num_experts_per_tok", 2))
        self.renormalize = renormalize
        width = int(hf.get("moe_intermediate_size") or config.intermediate_size)
        self.gate = Linear(config.hidden_size, num_experts(config), bias=False)
        self.experts = Experts(num_experts(config), config.hidden_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)


class MixtralDecoderLayer(Module):
    """Pre-norm attention then the feed-forward, which the checkpoint names `ffn_name`."""

    def __init__(self, config: ModelConfig, layer_idx: int, qk_norm: bool, ffn_name: str, ffn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        bias = config.attention_bias
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias=bias, o_bias=bias, qk_norm=qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_name = ffn_name
        self.add_module(ffn_name, ffn)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, rope)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class MixtralModel(Module):
    def __init__(self, config: ModelConfig, layers: list[MixtralDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MixtralForCausalLM(CausalLM):
    qk_norm = False
    ffn_name = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")  # gate, up, down

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        check_moe_config(config)
        layers = [
            MixtralDecoderLayer(config, i, self.qk_norm, self.ffn_name, self.feed_forward(config, i))
            for i in range(config.num_hidden_layers)
        ]
        self.model = MixtralModel(config, layers)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def feed_forward(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config, renormalize=True)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().load_weights(ExpertTensors(tensors, names=self.expert_names), dtype)

    def fuse_projections(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.fuse()
            ffn = getattr(layer, layer.ffn_name)
            if isinstance(ffn, GatedMLP):
                ffn.fuse()
