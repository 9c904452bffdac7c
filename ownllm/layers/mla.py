"""Multi-head latent attention (DeepSeek-V2/V3) over the paged KV cache, caching only the compressed latent.

Per token and layer the cache holds [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim)] (576 values for
DeepSeek-V3) as "keys" of one head with no values (KVCacheSpec(num_layers, 1, 576, 0)). Two ways to
attend over it:
- expanded: up-project every cached latent with kv_b_proj to per-head keys (nope | shared rope part)
  and values, then ordinary attention (transformers' form); cheapest when many queries share the context
  (prefill).
- absorbed: fold kv_b_proj's key half into the query (q_nope @ W_uk -> a query in latent space) and its
  value half into the output (latent-space attention output @ W_uv), so attention reads the latents as
  they are; cheapest for decode, where each step would otherwise re-expand the whole context.
MLA backends (an interface and a registry, MLA_BACKENDS; the runner picks one by name when it builds the
model) choose between them per forward: "expanded" (the reference), "absorbed", and "auto" (the default),
which runs decode-only batches absorbed and everything else expanded. Both use kv_b_proj
split per head by `split_kv_b()`, which the model calls once after loading. Attention math
runs in float32, as in layers/attention.py, whose paging pattern (slot writes, block-table gathers,
per-sequence causal masks) this copies; expanded attention in bf16 on the CPU runs its prompt kernel.
It never touches `kv_cache.v`, which is None for this layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ownllm.config import ModelConfig
from ownllm.distributed.parallel_state import divide, tp_group
from ownllm.kernels.build import on_bf16_cpu
from ownllm.layers.attention import AttentionMetadata, KVCacheSpec
from ownllm.layers.linear import GEMV_MAX_ROWS, Linear, fuse_linears, gemv_kernel
from ownllm.layers.module import Module
from ownllm.layers.norm import RMSNorm
from ownllm.layers.parallel import column_linear, row_linear
from ownllm.layers.registry import named
from ownllm.layers.rotary import RotaryEmbedding

LORA_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


def mla_kv_cache_spec(config: ModelConfig) -> KVCacheSpec:
    hf = config.hf_config
    return KVCacheSpec(config.num_hidden_layers, 1, int(hf["kv_lora_rank"]) + int(hf["qk_rope_head_dim"]), 0)


def yarn_softmax_scale(head_dim: int, scaling: dict | None) -> float:
    """head_dim^-0.5, times mscale^2 when yarn scaling sets mscale_all_dim (DeepSeek's yarn_get_mscale)."""
    scale = head_dim**-0.5
    scaling = scaling or {}
    if scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        factor = scaling["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * scaling["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def per_head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, K]; w: [heads, out, K] -> [N, heads, out]; a few bf16 rows: one kernel call, else bmm
    if x.shape[0] <= GEMV_MAX_ROWS and on_bf16_cpu(x) and w.dtype == torch.bfloat16 and gemv_kernel() is not None:
        return gemv_kernel().gemv_bf16_heads(x, w)
    return torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)


class MultiLatentAttention(Module):
    def __init__(self, config: ModelConfig, layer_idx: int, scale: float) -> None:
        super().__init__()
        hf = config.hf_config
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads = divide(config.num_attention_heads, tp_group().size, "attention heads")  # this rank's
        num_heads = config.num_attention_heads  # the latent (q_a, kv_a and the cache) is whole on every rank
        self.q_lora_rank = hf.get("q_lora_rank")
        self.kv_lora_rank = int(hf["kv_lora_rank"])
        self.nope_dim, self.rope_dim = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        self.v_dim = int(hf["v_head_dim"])
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = column_linear(self.q_lora_rank, num_heads * qk_dim)
        else:
            self.q_proj = column_linear(hidden, num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = column_linear(self.kv_lora_rank, num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = row_linear(num_heads * self.v_dim, hidden, bias)
        self.scale = scale
        self.layer_idx = layer_idx
        self.backend: ExpandedMLA = MLA_BACKENDS[DEFAULT_MLA_BACKEND]  # the runner's choice, bound at load

    def fuse(self) -> None:
        """After loading: q_a_proj and kv_a_proj_with_mqa (both read x) as one matmul."""
        if self.q_lora_rank and (fused := fuse_linears([self.q_a_proj, self.kv_a_proj_with_mqa])) is not None:
            self.q_kv_a_proj = fused
            del self.q_a_proj, self.kv_a_proj_with_mqa

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, hidden] -> q [T, heads * (nope + rope)], compressed kv [T, rank + rope]
        if hasattr(self, "q_kv_a_proj"):
            q_a, kv_a = self.q_kv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], dim=-1)
        else:
            q_a = self.q_a_proj(x) if self.q_lora_rank else None
            kv_a = self.kv_a_proj_with_mqa(x)
        q = self.q_b_proj(self.q_a_layernorm(q_a)) if self.q_lora_rank else self.q_proj(x)
        return q, kv_a

    def split_kv_b(self) -> None:
        """After loading: kv_b_proj split per head, then dropped (so the weights are held once): w_uk_t
        [heads, rank, nope_dim] and w_uv_t [heads, v_dim, rank], rows laid out as the decode kernel reads them."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk_t = w[:, : self.nope_dim].transpose(1, 2).contiguous()
        self.w_uv_t = w[:, self.nope_dim :].contiguous()
        del self.kv_b_proj

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        num_tokens = x.shape[0]
        q, kv_a = self._project(x)
        q_nope, q_rope = q.view(num_tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_rope, k_rope = rope(meta.positions, q_rope, k_rope[:, None, :])  # [T, heads, rope], [T, 1, rope]
        latent_cache = meta.kv_cache.k_layers[self.layer_idx]  # [num_blocks, block_size, 1, rank + rope]
        latent_cache.view(-1, self.kv_lora_rank + self.rope_dim)[meta.slot_mapping] = torch.cat(
            (self.kv_a_layernorm(c_kv), k_rope[:, 0]), dim=-1)
        out = self.backend.attend(self, q_nope, q_rope, latent_cache, meta)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))  # out: [T, heads, v_dim]

    def _latents(self, latent_cache: torch.Tensor, meta: AttentionMetadata, i: int) -> torch.Tensor:
        # -> [S, rank + rope]: sequence i's cached latents in position order
        blocks = meta.block_tables[i, : -(-meta.seq_lens[i] // meta.kv_cache.block_size)]
        return latent_cache.index_select(0, blocks).flatten(0, 2)[: meta.seq_lens[i]]

    def expanded_sequence(self, q_nope, q_rope, latent_cache, meta: AttentionMetadata, i: int) -> torch.Tensor:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        latents = self._latents(latent_cache, meta, i)
        c_kv, k_rope = latents.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [S, rank], [S, rope]
        k_nope = torch.einsum("sr,hrd->shd", c_kv, self.w_uk_t)  # [S, heads, nope]
        values = torch.einsum("sr,hvr->shv", c_kv, self.w_uv_t)  # [S, heads, v_dim]
        keys = torch.cat((k_nope, k_rope[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
        queries = torch.cat((q_nope[start:end], q_rope[start:end]), dim=-1)  # [Q, heads, nope + rope]
        out = meta.backend.sequence_kernel(queries, keys, values, meta.positions[start:end], 0, self.scale)
        if out is not None:
            return out
        mask = torch.arange(keys.shape[0], device=keys.device)[None, :] <= meta.positions[start:end, None]  # [Q, S]
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1).float(), keys.transpose(0, 1).float(), values.transpose(0, 1).float(),
            attn_mask=mask, scale=self.scale,
        )  # [heads, Q, v_dim]
        return out.transpose(0, 1).to(q_nope.dtype)

    def _latent_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        # q_nope: [N, heads, nope] -> [N, heads, rank + rope] float32: the query in latent space, beside its rope part
        q_latent = per_head_matmul(q_nope, self.w_uk_t)  # [N, heads, rank]
        return torch.cat((q_latent, q_rope), dim=-1).float()

    def _latent_output(self, out_latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # out_latent: [N, heads, rank] float32 -> [N, heads, v_dim]
        return per_head_matmul(out_latent.to(dtype), self.w_uv_t)

    def absorbed_sequence(self, q_nope, q_rope, latent_cache, meta: AttentionMetadata, i: int) -> torch.Tensor:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        latents = self._latents(latent_cache, meta, i).float()  # [S, rank + rope]
        query = self._latent_query(q_nope[start:end], q_rope[start:end])  # [Q, heads, rank + rope]
        scores = torch.einsum("qhr,sr->hqs", query, latents) * self.scale
        mask = torch.arange(latents.shape[0], device=latents.device)[None, :] <= meta.positions[start:end, None]  # [Q, S]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [heads, Q, S]
        out_latent = torch.einsum("hqs,sr->qhr", probs, latents[:, : self.kv_lora_rank])
        return self._latent_output(out_latent, q_nope.dtype)

    def absorbed_decode(self, q_nope, q_rope, latent_cache, meta: AttentionMetadata) -> torch.Tensor:
        # one query per sequence: gather each sequence's blocks, pad to the longest, mask the padding
        # (one sequence: cut at its length instead, since its query attends its whole context)
        num_seqs, max_blocks = meta.block_tables.shape
        latents = latent_cache.index_select(0, meta.block_tables.flatten()).view(
            num_seqs, max_blocks * meta.kv_cache.block_size, -1)  # [B, S, rank + rope]
        latents = (latents[:, : meta.seq_lens[0]] if num_seqs == 1 else latents).float()
        query = self._latent_query(q_nope, q_rope)  # [B, heads, rank + rope]
        scores = query @ latents.transpose(1, 2) * self.scale  # [B, heads, S]
        if num_seqs > 1:
            padding = torch.arange(latents.shape[1], device=latents.device)[None, :] > meta.positions[:, None]  # [B, S]
            scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        out_latent = scores.softmax(-1) @ latents[:, :, : self.kv_lora_rank]  # [B, heads, rank]
        return self._latent_output(out_latent, q_nope.dtype)


class ExpandedMLA:
    """The reference: every sequence's latents up-projected to per-head keys and values."""

    name = "expanded"

    def attend(self, layer: MultiLatentAttention, q_nope: torch.Tensor, q_rope: torch.Tensor,
               latent_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q_nope: [T, heads, nope]; q_rope: [T, heads, rope] -> [T, heads, v_dim]
        return torch.cat([layer.expanded_sequence(q_nope, q_rope, latent_cache, meta, i)
                          for i in range(len(meta.seq_lens))])


class AbsorbedMLA(ExpandedMLA):
    """kv_b_proj folded into the query and the output: attention over the latents as cached."""

    name = "absorbed"

    def attend(self, layer, q_nope, q_rope, latent_cache, meta) -> torch.Tensor:
        if meta.is_decode_only:
            return layer.absorbed_decode(q_nope, q_rope, latent_cache, meta)
        return torch.cat([layer.absorbed_sequence(q_nope, q_rope, latent_cache, meta, i)
                          for i in range(len(meta.seq_lens))])


class AutoMLA(ExpandedMLA):
    """Decode-only batches absorbed, everything else expanded."""

    name = "auto"

    def attend(self, layer, q_nope, q_rope, latent_cache, meta) -> torch.Tensor:
        if meta.is_decode_only:
            return layer.absorbed_decode(q_nope, q_rope, latent_cache, meta)
        return super().attend(layer, q_nope, q_rope, latent_cache, meta)


MLA_BACKENDS: dict[str, ExpandedMLA] = {b.name: b for b in (AutoMLA(), ExpandedMLA(), AbsorbedMLA())}
DEFAULT_MLA_BACKEND = "auto"


def mla_backend(name: str | None) -> ExpandedMLA:
    """The MLA backend named, or (None) "auto"."""
    return named(MLA_BACKENDS, name or DEFAULT_MLA_BACKEND, "MLA backend")
