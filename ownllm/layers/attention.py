"""Causal self-attention over the paged KV cache, and its backends (an interface and a registry).

The model runner builds one AttentionMetadata per forward (a flat batch of several sequences'
new tokens), carrying the attention backend it chose once, and passes it to every layer. Attention writes
the new keys and values into their cache slots, then attends each query over its sequence's cached context
(causal, optionally a sliding window or a local chunk; runs of tokens the metadata marks bidirectional, as
Gemma 3's image tokens, also see each other's later keys). Backends, by name: "torch", the reference
(decode-only batches as two padded batched matmuls, mixed prefill / decode batches as one SDPA call per
sequence), and "cpu_kernels", tested against it: in bfloat16 on the CPU, decode-only batches run as one call
of kernels/decode_ops.cpp, which reads the blocks in place, and each sequence of a mixed batch as one call of
kernels/prefill_attention.cpp on its gathered keys (bf16 dot products for the scores, float32 softmax and
sums: 8x SDPA on a 2048-token prompt).
Attention math runs in float32 on the CPU (CPU SDPA is several times slower in bfloat16, and the cache
reads are small next to the weights), in the model's dtype on a GPU, where only this path runs.
Gathers use index_select: advanced indexing of a large bfloat16 pool takes a slow path in torch. A new
backend subclasses TorchAttention, registers in ATTENTION_BACKENDS, and is tested against the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ownllm.kernels.build import avx2_kernels, cpu_has_avx2, cpu_has_bf16, decode_ops, prefill_attention_kernel
from ownllm.layers.module import Module
from ownllm.layers.registry import named


@dataclass(frozen=True)
class KVCacheSpec:
    """What one layer caches per token: keys of num_kv_heads x head_dim and values of num_kv_heads x v_head_dim
    (v_head_dim 0: keys only, e.g. MLA's compressed latent)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * self.num_kv_heads * (self.head_dim + self.v_head_dim) * dtype.itemsize


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS maps in on first touch (numpy's zeros is calloc, which mmaps large sizes):
    a pool of gigabytes costs nothing at start-up (torch.zeros wrote 2.6 GB in 2.9 s), and resident memory
    grows with what is used (so a pool larger than free memory fails when filled, not at start-up). Zeros,
    not garbage: the reference decode reads padded slots, masked."""
    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


class PagedKVCache:
    """The preallocated pool: k [num_layers, num_blocks, block_size, num_kv_heads, head_dim] and v alike;
    k_layers / v_layers: each layer's [num_blocks, ...] view, made once (indexing the pool cost ~2 us a call)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str = "cpu") -> None:
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads)

        def zeros(*dims: int) -> torch.Tensor:
            if torch.device(device).type == "cpu":
                return lazy_zeros(dims, dtype)
            return torch.zeros(dims, dtype=dtype, device=device)

        self.k = zeros(*shape, spec.head_dim)
        self.v = zeros(*shape, spec.v_head_dim) if spec.v_head_dim else None
        self.k_layers = self.k.unbind(0)
        self.v_layers = self.v.unbind(0) if self.v is not None else None
        self.block_size = block_size


@dataclass
class AttentionMetadata:
    """One forward's batch layout: sequence i owns tokens query_start_loc[i]:query_start_loc[i+1]."""

    positions: torch.Tensor  # [T] absolute position of each token
    slot_mapping: torch.Tensor  # [T] cache slot (block_id * block_size + offset) of each token
    query_start_loc: list[int]  # [B + 1]
    seq_lens: list[int]  # [B] context length of each sequence after this forward
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    kv_cache: PagedKVCache
    backend: "TorchAttention" = None  # chosen once by the runner; None: the CPU kernels where they apply
    # sequence index -> position ranges [start, end) whose tokens attend each other both ways (Gemma 3's images);
    # a range always lies within one forward's tokens of its sequence, so only the per-sequence path sees them
    bidirectional: dict[int, list[tuple[int, int]]] | None = None
    # [3, T] M-RoPE positions (Qwen2.5-VL: temporal, height, width) when a request of the step has images; rope only
    mrope_positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = ATTENTION_BACKENDS["cpu_kernels"]

    @functools.cached_property
    def is_decode_only(self) -> bool:  # asked by every layer
        return len(self.query_start_loc) - 1 == self.positions.shape[0]


def attention_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 on the CPU (its SDPA is several times slower in bfloat16); the model's dtype on a GPU, whose
    fused SDPA kernels take it and accumulate in float32."""
    return torch.float32 if q.is_cpu else q.dtype


def prefill_kernel_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                             key_start: int, scale: float, window: int | None = None,
                             chunk: int | None = None) -> torch.Tensor | None:
    """kernels/prefill_attention.cpp on one sequence: queries q [Q, heads, Dk] at `positions`, keys [S, kv_heads, Dk]
    and values [S, kv_heads, Dv] (key j at position key_start + j) -> [Q, heads, Dv]; causal, and within the
    window or the query's attention chunk if given. None where it does not apply: not bf16 on the CPU, or head
    sizes not multiples of 16 up to 256."""
    kernel = prefill_attention_kernel(q)
    if kernel is None or any(size % 16 or size > 256 for size in (q.shape[-1], values.shape[-1])):
        return None
    out = kernel.prefill_attention(q, keys, values, positions, key_start, scale, window or 0, chunk or 0)
    return out.view(q.shape[0], q.shape[1], values.shape[-1])


class Attention(Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int,
        sliding_window: int | None = None, chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.chunk_size = chunk_size  # Llama 4's local attention: keys in the query's aligned chunk only

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]
        return meta.backend.forward(self, q, k, v, meta)

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, bidirectional=()) -> torch.Tensor:
        """Bool mask broadcasting q_pos against k_pos: causal (or both within one of the `bidirectional` ranges
        [start, end)), and within the sliding window if any."""
        mask = k_pos <= q_pos
        for start, end in bidirectional:
            mask = mask | ((q_pos >= start) & (q_pos < end) & (k_pos >= start) & (k_pos < end))
        if self.sliding_window is not None:
            mask &= (q_pos - k_pos) < self.sliding_window
        if self.chunk_size is not None:
            mask &= k_pos // self.chunk_size == q_pos // self.chunk_size
        return mask


class TorchAttention:
    """The plain-torch reference backend: decode-only batches as two padded batched matmuls, mixed batches as one
    SDPA call per sequence."""

    name = "torch"

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache = meta.kv_cache.k_layers[layer.layer_idx]  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache = meta.kv_cache.v_layers[layer.layer_idx]
        k_cache.view(-1, layer.num_kv_heads, layer.head_dim)[meta.slot_mapping] = k
        v_cache.view(-1, layer.num_kv_heads, layer.head_dim)[meta.slot_mapping] = v
        if meta.is_decode_only:
            out = self.decode(layer, q, k_cache, v_cache, meta)
        else:
            out = torch.cat([self.sequence(layer, q, k_cache, v_cache, meta, i) for i in range(len(meta.seq_lens))])
        return out.reshape(q.shape[0], layer.num_heads * layer.head_dim)

    def decode(self, layer: Attention, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # one query per sequence: gather each sequence's blocks, pad to the longest, mask the padding
        num_seqs, max_blocks = meta.block_tables.shape
        flat_tables = meta.block_tables.flatten()
        keys = k_cache.index_select(0, flat_tables).view(
            num_seqs, max_blocks * meta.kv_cache.block_size, layer.num_kv_heads, layer.head_dim)
        values = v_cache.index_select(0, flat_tables).view_as(keys)  # [B, S, num_kv_heads, head_dim]
        k_pos = torch.arange(keys.shape[1], device=keys.device)[None, :]  # [1, S]
        mask = layer.allowed(meta.positions[:, None], k_pos)  # [B, S]
        group = layer.num_heads // layer.num_kv_heads
        math = attention_dtype(q)
        q = q.view(num_seqs, layer.num_kv_heads, group, layer.head_dim).to(math)  # [B, kv, g, D]
        scores = q @ keys.permute(0, 2, 3, 1).to(math) * layer.scale  # [B, kv, g, S]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        out = scores @ values.transpose(1, 2).to(math)  # [B, kv, g, D]
        return out.view(num_seqs, layer.num_heads, layer.head_dim).to(values.dtype)

    def sequence(self, layer: Attention, q, k_cache, v_cache, meta: AttentionMetadata, i: int) -> torch.Tensor:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        seq_len = meta.seq_lens[i]
        block_size = meta.kv_cache.block_size
        window = layer.sliding_window
        kv_start = 0 if window is None else max(0, seq_len - (end - start) - window + 1)
        first_block, num_blocks = kv_start // block_size, -(-seq_len // block_size)
        blocks = meta.block_tables[i, first_block:num_blocks]
        offset = first_block * block_size
        keys = k_cache.index_select(0, blocks).flatten(0, 1)[: seq_len - offset]  # [S, num_kv_heads, head_dim]
        values = v_cache.index_select(0, blocks).flatten(0, 1)[: seq_len - offset]
        bidirectional = (meta.bidirectional or {}).get(i, ())
        if not bidirectional:
            out = self.sequence_kernel(q[start:end], keys, values, meta.positions[start:end], offset, layer.scale,
                                       window, layer.chunk_size)
            if out is not None:
                return out
        k_pos = torch.arange(offset, seq_len, device=q.device)[None, :]  # [1, S]
        mask = layer.allowed(meta.positions[start:end, None], k_pos, bidirectional)  # [Q, S]
        math = attention_dtype(q)
        out = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).to(math), keys.transpose(0, 1).to(math), values.transpose(0, 1).to(math),
            attn_mask=mask, scale=layer.scale, enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [num_heads, Q, head_dim]
        return out.transpose(0, 1).to(q.dtype)

    def sequence_kernel(self, q, keys, values, positions, key_start, scale, window=None, chunk=None):
        """A faster attention of one sequence's queries over its gathered keys, or None (use SDPA)."""
        return None


class CpuKernelAttention(TorchAttention):
    """bf16 on the CPU: decode-only batches as one call of kernels/decode_ops.cpp, which writes the new keys and
    values and reads the blocks in place; each sequence of a mixed batch as one call of
    kernels/prefill_attention.cpp. Tensors the kernels do not take fall back to the reference."""

    name = "cpu_kernels"

    def forward(self, layer: Attention, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        ops = decode_ops(q) if meta.is_decode_only and layer.head_dim <= 512 else None
        if ops is None:
            return super().forward(layer, q, k, v, meta)
        return ops.paged_decode_attention(q, k, v, meta.kv_cache.k_layers[layer.layer_idx],
                                          meta.kv_cache.v_layers[layer.layer_idx], meta.slot_mapping, meta.positions,
                                          meta.block_tables, layer.scale, layer.sliding_window or 0,
                                          layer.chunk_size or 0)

    def sequence_kernel(self, q, keys, values, positions, key_start, scale, window=None, chunk=None):
        return prefill_kernel_attention(q, keys, values, positions, key_start, scale, window, chunk)


class Float32KernelAttention(TorchAttention):
    """float32 on a CPU with AVX2 (kernels/attention_f32.cpp): every query row, of a decode batch or a prompt,
    computed alone over the paged cache, so its numbers are the same in any batch, chunked or not, at decode as
    at prefill (what the integer kernels of layers/quant_avx2.py need: they round activations to 8 bits).
    Bidirectional ranges (images) and chunked attention (Llama 4) go to the reference."""

    name = "cpu_float32"

    @staticmethod
    def _kernel(layer: Attention, q: torch.Tensor):
        """attention_f32 where it takes this layer's float32 queries, else None (the reference)."""
        if q.dtype != torch.float32 or layer.chunk_size is not None:
            return None
        return avx2_kernels("attention_f32")

    def decode(self, layer: Attention, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        kernel = self._kernel(layer, q)
        if kernel is None:
            return super().decode(layer, q, k_cache, v_cache, meta)
        return kernel.paged_attention_f32(q.view(q.shape[0], layer.num_heads, layer.head_dim), k_cache, v_cache,
                                          meta.block_tables, meta.positions, layer.scale, layer.sliding_window or 0)

    def sequence(self, layer: Attention, q, k_cache, v_cache, meta: AttentionMetadata, i: int) -> torch.Tensor:
        kernel = self._kernel(layer, q)
        if kernel is None or (meta.bidirectional or {}).get(i):
            return super().sequence(layer, q, k_cache, v_cache, meta, i)
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        rows = q[start:end].view(end - start, layer.num_heads, layer.head_dim)
        return kernel.paged_attention_f32(rows, k_cache, v_cache, meta.block_tables[i : i + 1],
                                          meta.positions[start:end], layer.scale, layer.sliding_window or 0)


ATTENTION_BACKENDS: dict[str, TorchAttention] = {
    b.name: b for b in (TorchAttention(), CpuKernelAttention(), Float32KernelAttention())}


def attention_backend(name: str | None, dtype: torch.dtype, device: str) -> TorchAttention:
    """The backend named, or (None) the fastest that runs here: the CPU kernels for bfloat16 on a CPU with
    AVX-512 BF16, the float32 one for float32 on a CPU with AVX2 but not those (where quantized weights compute in
    float32: layers/quant_avx2.py), else the reference."""
    if name is None:
        cpu = torch.device(device).type == "cpu"
        if cpu and dtype == torch.bfloat16 and cpu_has_bf16():
            name = "cpu_kernels"
        elif cpu and dtype == torch.float32 and not cpu_has_bf16() and cpu_has_avx2():
            name = "cpu_float32"
        else:
            name = "torch"
    return named(ATTENTION_BACKENDS, name, "attention backend")
