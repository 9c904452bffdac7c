"""A Llama-family decoder's decode step as one C++ call: all its layers, no Python between them.

At batch 1 a 30-layer 135M model spends more time in the Python and dispatch of its ~13 small calls per layer
than in its matmuls (bench/decode_profile.py). DecodeStack hands the whole stack of layers to
kernels/decode_ops.cpp's DecodeLayers, built once per model and KV pool with every layer's weights: per step,
Python computes the rotary cos/sin once and makes one call. The C++ loop runs the same kernels in the same order
as the Python layers (RMSNorm, fused qkv, RoPE, paged attention, o_proj, residual add fused with the next
RMSNorm, fused gate_up, SiLU-and-multiply, down_proj), so the numbers are the same, bit for bit, in any batch.

It applies to decode-only batches of up to GEMV_MAX_ROWS rows, in bfloat16 on a CPU with the kernels, for models
whose layers are exactly the Llama decoder layer (Llama, Mistral, Qwen2, Qwen3) with fused projections, SiLU,
rotate-half RoPE, no tensor parallelism; anything else (prefill, other layers) runs the Python layers. Dense bf16
projections are multiplied in C++; quantized ones (GGUF files) are called back as their Linear's forward, one
Python call each. OWNLLM_NO_DECODE_STACK=1 turns it off (to compare).
"""

from __future__ import annotations

import os

import torch

from ownllm.distributed.parallel_state import tp_group
from ownllm.kernels.build import GEMV_MAX_ROWS, decode_ops
from ownllm.layers.attention import AttentionMetadata, CpuKernelAttention, PagedKVCache
from ownllm.layers.linear import Linear
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.norm import RMSNorm
from ownllm.layers.rotary import RotaryEmbedding

NONE = torch.empty(0, dtype=torch.bfloat16)  # an absent bias or q/k norm, as the C++ side takes it


def _dense(linear: Linear) -> bool:
    """Weights the kernel multiplies itself (gemv_bf16's tiles); others it calls the Linear for."""
    return (linear.weight is not None and linear.weight.dtype == torch.bfloat16 and linear.weight.is_contiguous()
            and (linear.bias is None or linear.bias.dtype == torch.bfloat16))


def _projection(linear) -> bool:
    return type(linear) is Linear and (_dense(linear) or linear.weight is None)  # dense, or quantized (packed)


def _norm(norm) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


class DecodeStack:
    """The layers of `model` (a LlamaForCausalLM or subclass) as one kernel call per decode step."""

    def __init__(self, model) -> None:
        self.model = model
        self.rope = model.rope
        self._kernel = None  # DecodeLayers, for the pool in self._cache
        self._cache: PagedKVCache | None = None

    @classmethod
    def build(cls, model) -> "DecodeStack | None":
        """The stack for `model`, or None when its layers are not ones the kernel computes as they do."""
        from ownllm.models.base import CausalLM
        from ownllm.models.llama import LlamaAttention, LlamaDecoderLayer

        if os.environ.get("OWNLLM_NO_DECODE_STACK") == "1" or tp_group().size != 1:
            return None
        if (type(model).hidden_states is not CausalLM.hidden_states or type(model).rope_for is not CausalLM.rope_for
                or type(model.rope) is not RotaryEmbedding):
            return None
        if torch.device(model.model.norm.weight.device).type != "cpu":
            return None
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (type(layer) is LlamaDecoderLayer and type(attn) is LlamaAttention and type(mlp) is GatedMLP
                    and _norm(layer.input_layernorm) and _norm(layer.post_attention_layernorm)
                    and hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj") and mlp.act_name == "silu"
                    and all(_projection(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
                    and (not attn.qk_norm or (_norm(attn.q_norm) and _norm(attn.k_norm)))
                    and attn.attn.chunk_size is None and attn.head_dim <= 512):
                return None
        attns = [layer.self_attn for layer in model.model.layers]
        norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms += [n for a in attns if a.qk_norm for n in (a.q_norm, a.k_norm)]
        if (len({n.eps for n in norms}) != 1 or len({a.attn.scale for a in attns}) != 1
                or any(a.attn.layer_idx != i for i, a in enumerate(attns))):
            return None  # one eps and one scale for all, passed once; layer i reads cache view i
        if decode_ops(model.model.norm.weight) is None:
            return None
        return cls(model)

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step is one the kernel runs: decode rows only, few enough, with the CPU kernel backend."""
        return (x.shape[0] <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and x.is_cpu and meta.is_decode_only
                and type(meta.backend) is CpuKernelAttention and not meta.bidirectional)

    def _layers(self, cache: PagedKVCache):
        """DecodeLayers for this KV pool, made on the first step over it: it holds the weight tensors as they are
        then (weights swapped in later would not be seen; nothing in ownllm swaps them after loading)."""
        if self._cache is not cache:
            layers, projections, windows = [], [], []
            for layer in self.model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
                # (weight, bias) of each projection the kernel multiplies; NONE where it calls the Linear instead
                dense = [(p.weight, NONE if p.bias is None else p.bias) if _dense(p) else (NONE, NONE) for p in linears]
                layers.append([
                    layer.input_layernorm.weight, *dense[0],
                    attn.q_norm.weight if attn.qk_norm else NONE, attn.k_norm.weight if attn.qk_norm else NONE,
                    *dense[1], layer.post_attention_layernorm.weight, *dense[2], *dense[3],
                ])
                projections.append([None if _dense(p) else p.forward for p in linears])
                windows.append(attn.attn.sliding_window or 0)
            first = self.model.model.layers[0]
            attn = first.self_attn
            self._kernel = decode_ops(first.input_layernorm.weight).DecodeLayers(
                layers, projections, list(cache.k_layers), list(cache.v_layers), windows, attn.num_heads,
                attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps, attn.attn.scale)
            self._cache = cache
        return self._kernel

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: [B, hidden] input embeddings -> [B, hidden], the last layer's output (before the final norm)
        cos, sin = self.rope.cos_sin(meta.positions, x.dtype)  # [B, 1, head_dim] each
        return self._layers(meta.kv_cache).forward(x, cos, sin, meta.slot_mapping, meta.positions, meta.block_tables)
