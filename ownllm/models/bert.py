"""BertModel (BERT, MiniLM, the all-MiniLM / bge / e5 family of sentence encoders): a post-norm bidirectional
encoder over a batch of texts -> one hidden vector per token. Padding costs only attention: the other layers see
the real tokens alone, packed. No KV cache, no logits; pooling the vectors into one embedding per text is
layers/pooler.py's job. HF parameter names; the pooler head (pooler.dense), which sentence-transformers never
uses, is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear, fuse_linears
from ownllm.layers.mlp import activation
from ownllm.layers.module import Module
from ownllm.models.base import CausalLM

@dataclass(frozen=True)
class PaddedBatch:
    """Where a right-padded batch's real tokens are: the model keeps them packed ([T, ...], T real tokens) and pads
    them only for attention."""

    indices: torch.Tensor  # [T]: each real token's place in the flattened [B * L] batch
    key_mask: torch.Tensor  # [B, 1, 1, L], True for real tokens
    positions: torch.Tensor  # [T]: each token's position in its text

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "PaddedBatch":
        batch, length = attention_mask.shape
        indices = attention_mask.flatten().nonzero().squeeze(1)
        return cls(indices, attention_mask.bool()[:, None, None, :], indices % length)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [B, L, D], zeros at padding
        batch, length = self.key_mask.shape[0], self.key_mask.shape[-1]
        padded = x.new_zeros(batch * length, x.shape[-1])
        padded[self.indices] = x
        return padded.view(batch, length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D] -> [T, D]
        return x.flatten(0, 1)[self.indices]


class BertEmbeddings(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, hidden)
        self.position_embeddings = Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, hidden]; every text is one segment (token type 0)
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

    def forward(self, x: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        qkv = batch.pad(self.qkv(x))  # [B, L, 3 * hidden]
        num_texts, length, _ = qkv.shape
        q, k, v = qkv.view(num_texts, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.key_mask)  # [B, heads, L, head_dim]
        return batch.unpad(out.transpose(1, 2).reshape(num_texts, length, -1))


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

    def forward(self, x: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
        return self.output(self.self(x, batch), x)


class BertIntermediate(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = activation(config.hidden_act, "BertModel")
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
        x = self.attention(x, batch)
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

    def fuse_projections(self) -> None:
        for layer in self.encoder.layer:
            layer.attention.self.fuse()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L], right-padded (mask 1 for real tokens) -> hidden states [B, L, hidden],
        zeros at padding. Only real tokens go through the projections and feed-forward."""
        batch = PaddedBatch.from_mask(attention_mask)
        x = self.embeddings(input_ids.flatten()[batch.indices], batch.positions)  # [T, hidden]
        for layer in self.encoder.layer:
            x = layer(x, batch)
        return batch.pad(x)
