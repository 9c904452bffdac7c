"""Causal self-attention over a KV cache, and the cache itself.

AttentionMetadata is what the model runner builds once per forward and passes down to every layer;
the Attention module writes the new keys/values into the cache and attends over the cached context
(causal, optionally a sliding window). This is the plain-torch reference path (SDPA) the CPU tests
run; the paged cache and faster backends plug in behind the same `Attention.forward` signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SequenceKVCache:
    """One sequence's keys and values for every layer, contiguous, grown in chunks as it lengthens."""

    GROW_BY = 256

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.shape = (num_layers, 0, num_kv_heads, head_dim)
        self.k = torch.empty(self.shape, dtype=dtype)  # [num_layers, capacity, num_kv_heads, head_dim]
        self.v = torch.empty(self.shape, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, num_tokens: int, num_valid: int) -> None:
        """Make room for num_tokens positions, keeping the first num_valid."""
        if num_tokens <= self.capacity:
            return
        capacity = num_tokens + self.GROW_BY
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], capacity, *old.shape[2:]))
            new[:, :num_valid] = old[:, :num_valid]
            setattr(self, name, new)


@dataclass
class AttentionMetadata:
    """Per-forward inputs every attention layer needs: where the new tokens sit and the cache they extend."""

    positions: torch.Tensor  # [T] absolute positions of this forward's tokens, contiguous
    kv_cache: SequenceKVCache

    @property
    def start(self) -> int:
        return int(self.positions[0])

    @property
    def end(self) -> int:
        return self.start + self.positions.shape[0]


def _attention_mask(start: int, num_queries: int, kv_start: int, kv_end: int, window: int | None) -> torch.Tensor:
    """[num_queries, kv_end - kv_start] bool: query at position p sees key j iff j <= p and p - j < window."""
    q_pos = torch.arange(start, start + num_queries)[:, None]
    k_pos = torch.arange(kv_start, kv_end)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]
        cache, start, end = meta.kv_cache, meta.start, meta.end
        cache.k[self.layer_idx, start:end] = k
        cache.v[self.layer_idx, start:end] = v
        kv_start = 0 if self.sliding_window is None else max(0, start - self.sliding_window + 1)
        keys = cache.k[self.layer_idx, kv_start:end].transpose(0, 1)  # [num_kv_heads, S, head_dim]
        values = cache.v[self.layer_idx, kv_start:end].transpose(0, 1)
        num_queries = q.shape[0]
        mask = None
        if num_queries > 1 or self.sliding_window is not None:
            mask = _attention_mask(start, num_queries, kv_start, end, self.sliding_window)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [num_heads, T, head_dim]
        return out.transpose(0, 1).reshape(num_queries, self.num_heads * self.head_dim)
