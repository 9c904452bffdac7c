"""DeepseekV3MTP: DeepSeek-V3's multi-token-prediction layer, a one-layer model that drafts for its own target.

The checkpoint stores it as layer `model.layers.<num_hidden_layers>.*` (transformers skips it). At position i it
reads the target's last hidden state h_i (before the final norm) and the embedding of the next token t_{i+1}:
x = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]), then one DeepSeek-V3 decoder layer (MLA, MoE) over its own
one-layer KV cache, then shared_head.norm and shared_head.head give logits for t_{i+2}. The embedding at position 0
is zeroed first, as vLLM's deepseek_mtp does. Drafting further steps feeds its own output back as h (vLLM's
chaining). The layer's embed_tokens and shared_head.head are the target's own in DeepSeek's files; where a
checkpoint leaves them out, the target's are read instead.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata, KVCacheSpec
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear
from ownllm.layers.mla import mla_kv_cache_spec
from ownllm.layers.module import Module
from ownllm.layers.moe import ExpertTensors, check_moe_config
from ownllm.layers.norm import RMSNorm
from ownllm.models.base import CausalLM
from ownllm.models.deepseek_v3 import DeepseekV3DecoderLayer, load_deepseek_weights, rotary_embedding, softmax_scale

BLOCK = "mtp_block."  # our name for the decoder layer, whose tensors the checkpoint keeps directly under the layer
TARGET_FALLBACKS = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def num_mtp_layers(config: ModelConfig) -> int:
    return int(config.hf_config.get("num_nextn_predict_layers") or 0)


def mtp_prefix(config: ModelConfig) -> str:
    return f"model.layers.{config.num_hidden_layers}."


class SharedHead(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)


class DeepseekV3MTP(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        check_moe_config(config)
        hidden = config.hidden_size
        self.embed_tokens = Embedding(config.vocab_size, hidden)
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden, bias=False)
        self.mtp_block = DeepseekV3DecoderLayer(config, config.num_hidden_layers, softmax_scale(config), cache_index=0)
        self.shared_head = SharedHead(config)
        self.rope = rotary_embedding(config)

    @classmethod
    def kv_cache_spec(cls, config: ModelConfig) -> KVCacheSpec:
        spec = mla_kv_cache_spec(config)
        return KVCacheSpec(1, spec.num_kv_heads, spec.head_dim, spec.v_head_dim)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        prefix = mtp_prefix(self.config)

        def checkpoint_name(name: str) -> str:
            stored = prefix + name.removeprefix(BLOCK)
            return stored if stored in tensors or name not in TARGET_FALLBACKS else TARGET_FALLBACKS[name]

        load_deepseek_weights(self, ExpertTensors(tensors, rename=checkpoint_name), dtype)

    def fuse_projections(self) -> None:
        self.mtp_block.post_load()

    def forward(self, input_ids: torch.Tensor, previous_hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids: [T] the token after each position; previous_hidden: [T, hidden] the target's hidden states
        there before its final norm (or this layer's own outputs, when chaining) -> [T, hidden], before
        shared_head.norm."""
        embeds = self.embed_tokens(input_ids).masked_fill((meta.positions == 0)[:, None], 0)  # [T, hidden]
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(previous_hidden)), dim=-1))  # [T, hidden]
        return self.mtp_block(x, meta, self.rope)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] -> logits [N, vocab_size]."""
        return self.shared_head.head(self.shared_head.norm(hidden))


def has_mtp_tensors(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> bool:
    return num_mtp_layers(config) > 0 and mtp_prefix(config) + "eh_proj.weight" in tensors
