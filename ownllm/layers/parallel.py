"""Tensor-parallel layers: each rank holds a slice of a weight and the layer joins the ranks' results.

- column_linear: output rows split (q, k and v by heads, gate and up by rows): each rank computes its own
  outputs, no communication. Fusing q, k and v (or gate and up) after loading then stacks the rank's own
  slices, so the fused weight is sharded per head (per row), as vLLM's QKVParallelLinear and
  MergedColumnParallelLinear are.
- row_linear: input columns split (o_proj, down_proj): each rank multiplies its columns by its slice of the
  activations; the partial sums are all-reduced, then the bias is added once.
- vocab_embedding: vocabulary rows split; a rank looks up the ids it holds (zeros elsewhere), all-reduce.
- lm_head: vocabulary rows split; each rank's logits are all-gathered so every rank samples from all of them.
A vocabulary that T does not divide is padded to T equal slices (rows past the vocabulary are zeros and
their logits are cut off after the gather).

At tensor parallel size 1 each function returns the plain layer: the single-process path is untouched. Each
parallel layer records in `tp_shards` which dimension of each parameter is split, and load_shard reads only
that slice from the checkpoint (safetensors get_slice; GGUF quantized rows only on block boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ownllm.distributed.parallel_state import divide, tp_group
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear, linear
from ownllm.layers.quant import BLOCK_FORMATS, GROUP_SIZE, BlockWeight, Int4Weight


@dataclass(frozen=True)
class Shard:
    """Rows start:stop of dimension `dim` of the checkpoint tensor, zero-padded to `size` along it: one of
    num_shards."""

    dim: int
    start: int
    stop: int
    size: int
    num_shards: int


def _even_shard(dim: int, total: int, what: str) -> Shard:
    tp = tp_group()
    part = divide(total, tp.size, what)
    return Shard(dim, tp.rank * part, (tp.rank + 1) * part, part, tp.size)


def _vocab_shard(vocab_size: int) -> Shard:
    tp = tp_group()
    part = -(-vocab_size // tp.size)
    start = min(tp.rank * part, vocab_size)
    return Shard(0, start, min(start + part, vocab_size), part, tp.size)


def column_linear(in_features: int, out_features: int, bias: bool = False, what: str = "output features") -> Linear:
    """out_features split across the ranks (`what` names them in the error when T does not divide them)."""
    if tp_group().size == 1:
        return Linear(in_features, out_features, bias=bias)
    shard = _even_shard(0, out_features, what)
    layer = Linear(in_features, shard.size, bias=bias)
    layer.tp_shards = {"weight": shard, "bias": shard}
    return layer


class RowParallelLinear(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in / tp] -> [T, out]
        partial = self.packed.matmul(x, None) if self.weight is None else linear(x, self.weight)
        out = tp_group().all_reduce(partial)
        return out if self.bias is None else out + self.bias


def row_linear(in_features: int, out_features: int, bias: bool = False, what: str = "input features") -> Linear:
    """in_features split across the ranks; the bias, whole on every rank, is added once after the sum."""
    if tp_group().size == 1:
        return Linear(in_features, out_features, bias=bias)
    shard = _even_shard(1, in_features, what)
    layer = RowParallelLinear(shard.size, out_features, bias=bias)
    layer.tp_shards = {"weight": shard}
    return layer


def attention_projections(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool,
                          o_bias: bool) -> tuple[int, int, Linear, Linear, Linear, Linear]:
    """Grouped-query attention's q, k, v (column-parallel) and o (row-parallel) projections, each rank holding
    its share of the q heads and of the kv heads -> (the rank's q heads, kv heads, q_proj, k_proj, v_proj, o_proj)."""
    tp_size = tp_group().size
    local_heads = divide(num_heads, tp_size, "attention heads")
    local_kv_heads = divide(num_kv_heads, tp_size, "KV heads")
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return (local_heads, local_kv_heads, column_linear(hidden_size, q_size, qkv_bias),
            column_linear(hidden_size, kv_size, qkv_bias), column_linear(hidden_size, kv_size, qkv_bias),
            row_linear(q_size, hidden_size, o_bias))


class VocabParallelEmbedding(Embedding):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, embedding_dim]
        shard = self.tp_shards["weight"]
        is_mine = (input_ids >= shard.start) & (input_ids < shard.stop)  # [T]
        local = torch.where(is_mine, input_ids - shard.start, 0)
        rows = super().forward(local)
        rows = rows * is_mine.unsqueeze(-1).to(rows.dtype)  # [T, embedding_dim], zeros for others' ids
        return tp_group().all_reduce(rows)


def vocab_embedding(vocab_size: int, embedding_dim: int) -> Embedding:
    if tp_group().size == 1:
        return Embedding(vocab_size, embedding_dim)
    shard = _vocab_shard(vocab_size)
    layer = VocabParallelEmbedding(shard.size, embedding_dim)
    layer.tp_shards = {"weight": shard}
    return layer


class ParallelLMHead(Linear):
    vocab_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> logits [N, vocab] on every rank
        return tp_group().all_gather(super().forward(x))[:, : self.vocab_size]


def lm_head(hidden_size: int, vocab_size: int) -> Linear:
    if tp_group().size == 1:
        return Linear(hidden_size, vocab_size, bias=False)
    shard = _vocab_shard(vocab_size)
    layer = ParallelLMHead(hidden_size, shard.size, bias=False)
    layer.vocab_size = vocab_size
    layer.tp_shards = {"weight": shard}
    return layer


def load_shard(tensors: Mapping[str, torch.Tensor], name: str, shard: Shard):
    """Only this rank's slice of tensor `name`, padded to the shard's size; reads just that slice from a
    safetensors file. GGUF quantized weights split on their blocks' boundaries, or raise naming the tensor."""
    get_slice = getattr(tensors, "get_slice", None)
    if get_slice is not None:
        whole = get_slice(name)
        index = [slice(None)] * len(whole.get_shape())
        index[shard.dim] = slice(shard.start, shard.stop)
        tensor = whole[tuple(index)]
    else:
        tensor = tensors[name]
        if isinstance(tensor, (Int4Weight, BlockWeight)):
            return _quantized_shard(tensor, name, shard)
        tensor = tensor.narrow(shard.dim, shard.start, shard.stop - shard.start)
    missing = shard.size - (shard.stop - shard.start)
    if missing:
        pad = [0, 0] * (tensor.dim() - 1 - shard.dim) + [0, missing]
        tensor = F.pad(tensor, pad)
    return tensor.contiguous()


def _quantized_shard(weight: Int4Weight | BlockWeight, name: str, shard: Shard) -> Int4Weight | BlockWeight:
    """Rows (dim 0) split anywhere; columns (dim 1) only where each slice holds whole quantization blocks."""
    if shard.stop - shard.start != shard.size:
        raise ValueError(f"tensor {name!r} is quantized and its {weight.shape[0]} rows do not split into "
                         f"{shard.num_shards} equal parts")
    if shard.dim == 0:
        return weight.map_rows(lambda rows: rows[shard.start : shard.stop])
    block = GROUP_SIZE if isinstance(weight, Int4Weight) else BLOCK_FORMATS[weight.qtype][0]
    if shard.start % block or shard.size % block:
        raise ValueError(f"tensor {name!r} is quantized in blocks of {block} weights, and its {weight.shape[1]} "
                         f"columns do not split into {shard.num_shards} parts on block boundaries")
    if isinstance(weight, Int4Weight):
        groups = slice(shard.start // block, shard.stop // block)
        return Int4Weight(*(part.contiguous() for part in (
            weight.codes[:, shard.start // 2 : shard.stop // 2],  # two codes a byte, groups of 32 whole
            weight.scale[:, groups], weight.zero[:, groups])))
    nbytes = BLOCK_FORMATS[weight.qtype][1]
    return BlockWeight(weight.blocks[:, shard.start // block * nbytes : shard.stop // block * nbytes].contiguous(),
                       weight.qtype)
