"""BertModel (BERT, MiniLM, the all-MiniLM / bge / e5 family of sentence encoders): a post-norm bidirectional
encoder over a padded batch of texts -> one hidden vector per token. No KV cache, no logits; pooling those vectors
into one embedding per text is layers/pooler.py's job. HF parameter names; the pooler head (pooler.dense), which
sentence-transformers never uses, is not loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear, fuse_linears
from ownllm.layers.module import Module
from ownllm.models.base import CausalLM

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class BertEmbeddings(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, hidden)
        self.position_embeddings = Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, L] -> [B, L, hidden]; every text is one segment (token type 0), positions from 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, hidden // config.num_attention_heads
        self.query = Linear(hidden, hidden)
        self.key = Linear(hidden, hidden)
        self.value = Linear(hidden, hidden)

    def fuse(self) -> None:
        self.qkv = fuse_linears([self.query, self.key, self.value])
        del self.query, self.key, self.value

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x: [B, L, hidden], key_mask: [B, 1, 1, L] (True: a real token) -> [B, L, hidden]
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return out.transpose(1, 2).reshape(batch, length, hidden)


class BertSelfOutput(Module):
    """The projection after attention (or the feed-forward's second matmul), added to its input, then LayerNorm."""

    def __init__(self, config: ModelConfig, in_features: int) -> None:
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {config.hidden_act!r} is not supported for BertModel; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(CausalLM):
    """Takes CausalLM's loading (HF names, adopted tensors, frozen modules); forward() encodes instead of decoding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        position_type = config.hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"config.json: position_embedding_type {position_type!r} is not supported; only absolute")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def post_load(self) -> None:
        for layer in self.encoder.layer:
            layer.attention.self.fuse()
        super().post_load()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L] (mask 1 for real tokens, 0 for padding) -> hidden states [B, L, hidden]."""
        key_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x
