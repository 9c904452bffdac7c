"""A Llama-family decoder's decode step as one C++ call: all its layers, no Python between them.

At batch 1 a 30-layer 135M model spends more time in the Python and dispatch of its ~13 small calls per layer
than in its matmuls (bench/decode_profile.py). DecodeStack hands the whole stack of layers to
kernels/decode_ops.cpp's DecodeLayers, built once per model and KV pool with every layer's weights: per step,
Python computes the rotary cos/sin once and makes one call. The C++ loop runs the same kernels in the same order
as the Python layers (RMSNorm, fused qkv, RoPE, paged attention, o_proj, residual add fused with the next
RMSNorm, fused gate_up, SiLU-and-multiply, down_proj), so the numbers are the same, bit for bit, in any batch.

It applies to decode-only batches (bfloat16: of up to GEMV_MAX_ROWS rows) on a CPU with the kernels, for models
whose layers are exactly the Llama decoder layer (Llama, Mistral, Qwen2, Qwen3) with SiLU, rotate-half RoPE, no
tensor parallelism; anything else (prefill, other layers) runs the Python layers. Two kernels:
- bfloat16 (AVX-512 BF16): decode_ops.cpp's DecodeLayers, for fused projections; dense bf16 ones multiplied in C++,
  quantized ones (GGUF files) called back as their Linear's forward, one Python call each;
- float32 (CPUs with AVX2 and no AVX-512, where GGUF files and 16-bit checkpoints compute in float32):
  decode_f32.cpp's DecodeLayersF32, which calls x16_avx2's integer matmuls, half_avx2's 16-bit ones and
  attention_f32's attention itself (fused projections or not) and
  rounds every other step as torch's ops do, so its numbers are the Python layers' bit for bit.
OWNLLM_NO_DECODE_STACK=1 turns it off (to compare).
"""

from __future__ import annotations

import functools
import os

import torch

from ownllm.distributed.parallel_state import tp_group
from ownllm.kernels.build import GEMV_MAX_ROWS, avx2_kernels, decode_ops
from ownllm.layers.attention import AttentionMetadata, CpuKernelAttention, Float32KernelAttention, PagedKVCache
from ownllm.layers.linear import HALF_DTYPES, Linear
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.norm import RMSNorm
from ownllm.layers.quant_avx2 import X16Weight
from ownllm.layers.rotary import RotaryEmbedding

NONE = torch.empty(0, dtype=torch.bfloat16)  # an absent bias or q/k norm, as the C++ side takes it
NONE_F32 = torch.empty(0)


def _dense(linear: Linear, dtype: torch.dtype) -> bool:
    """Weights the kernel multiplies itself (bf16: gemv_bf16's tiles; float32: float32 or 16-bit weights, the
    latter with half_avx2's); others it calls the Linear for."""
    weight_dtypes = (dtype, *HALF_DTYPES) if dtype == torch.float32 else (dtype,)
    return (linear.weight is not None and linear.weight.dtype in weight_dtypes and linear.weight.is_contiguous()
            and (linear.bias is None or linear.bias.dtype == dtype))


def _projections(module, fused: str, parts: tuple[str, ...], dtype: torch.dtype) -> list[Linear] | None:
    """The Linears of `module`'s fused projection (or, in float32, of its unfused parts), or None where one is not a
    plain Linear the kernel can take (dense, or quantized: packed)."""
    linears = [getattr(module, fused)] if hasattr(module, fused) else [getattr(module, p, None) for p in parts]
    if len(linears) > 1 and dtype != torch.float32:
        return None  # decode_ops's DecodeLayers takes fused projections only
    ok = all(type(p) is Linear and (_dense(p, dtype) or p.weight is None) for p in linears)
    return linears if ok else None


def _norm(norm, dtype: torch.dtype) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == dtype


def _part(linear: Linear) -> tuple:
    """A float32 projection as DecodeLayersF32 takes it: x16_avx2's layout, dense (float32, or 16-bit: half_avx2), or
    the Linear's own forward."""
    if linear.weight is not None:
        return ("half" if linear.weight.dtype in HALF_DTYPES else "dense", linear.weight, linear.bias)
    packed = linear.packed
    if isinstance(packed, X16Weight):
        return ("x16", packed.blocks, packed.rows, packed.layout, packed.block, linear.bias)
    return ("call", linear.forward)


@functools.cache  # checked at every decode step: the answer does not change once the kernels are loaded (or not)
def _f32_kernels_built() -> bool:
    return all(avx2_kernels(name) is not None for name in ("decode_f32", "x16_avx2", "half_avx2", "attention_f32"))


class DecodeStack:
    """The layers of `model` (a LlamaForCausalLM or subclass) as one kernel call per decode step."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.model = model
        self.rope = model.rope
        self.dtype = dtype
        self.backend = CpuKernelAttention if dtype == torch.bfloat16 else Float32KernelAttention
        self._kernel = None  # DecodeLayers (or DecodeLayersF32), for the pool in self._cache
        self._cache: PagedKVCache | None = None

    @classmethod
    def build(cls, model) -> "DecodeStack | None":
        """The stack for `model`, or None when its layers are not ones a kernel computes as they do."""
        from ownllm.models.base import CausalLM
        from ownllm.models.llama import LlamaAttention, LlamaDecoderLayer

        if os.environ.get("OWNLLM_NO_DECODE_STACK") == "1" or tp_group().size != 1:
            return None
        if (type(model).hidden_states is not CausalLM.hidden_states or type(model).rope_for is not CausalLM.rope_for
                or type(model.rope) is not RotaryEmbedding):
            return None
        weight = model.model.norm.weight
        if torch.device(weight.device).type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
            return None
        dtype = weight.dtype
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (type(layer) is LlamaDecoderLayer and type(attn) is LlamaAttention and type(mlp) is GatedMLP
                    and _norm(layer.input_layernorm, dtype) and _norm(layer.post_attention_layernorm, dtype)
                    and _projections(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), dtype)
                    and _projections(mlp, "gate_up_proj", ("gate_proj", "up_proj"), dtype)
                    and _projections(attn, "o_proj", (), dtype) and _projections(mlp, "down_proj", (), dtype)
                    and mlp.act_name == "silu"
                    and (not attn.qk_norm or (_norm(attn.q_norm, dtype) and _norm(attn.k_norm, dtype)))
                    and attn.attn.chunk_size is None and attn.head_dim <= 512):
                return None
        attns = [layer.self_attn for layer in model.model.layers]
        norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms += [n for a in attns if a.qk_norm for n in (a.q_norm, a.k_norm)]
        if (len({n.eps for n in norms}) != 1 or len({a.attn.scale for a in attns}) != 1
                or any(a.attn.layer_idx != i for i, a in enumerate(attns))):
            return None  # one eps and one scale for all, passed once; layer i reads cache view i
        if dtype == torch.bfloat16 and decode_ops(weight) is None:
            return None
        return cls(model, dtype)

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step is one the kernel runs: decode rows only (bf16: few enough), with its attention backend
        (float32: cpu_float32, the default on AVX2 CPUs without AVX-512, and the kernels built)."""
        return (x.dtype == self.dtype and x.is_cpu and meta.is_decode_only and type(meta.backend) is self.backend
                and not meta.bidirectional and (x.shape[0] <= GEMV_MAX_ROWS if self.dtype == torch.bfloat16
                                                else _f32_kernels_built()))

    def _layers(self, cache: PagedKVCache):
        """The kernel for this KV pool, made on the first step over it: it holds the weight tensors as they are
        then (weights swapped in later would not be seen; nothing in ownllm swaps them after loading)."""
        if self._cache is not cache:
            self._kernel = (self._bf16_layers if self.dtype == torch.bfloat16 else self._f32_layers)(cache)
            self._cache = cache
        return self._kernel

    def _bf16_layers(self, cache: PagedKVCache):
        layers, projections, windows = [], [], []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            dense = [_dense(p, torch.bfloat16) for p in linears]
            # (weight, bias) of each projection the kernel multiplies; NONE where it calls the Linear instead
            tensors = [(p.weight, NONE if p.bias is None else p.bias) if d else (NONE, NONE)
                       for p, d in zip(linears, dense)]
            layers.append([
                layer.input_layernorm.weight, *tensors[0],
                attn.q_norm.weight if attn.qk_norm else NONE, attn.k_norm.weight if attn.qk_norm else NONE,
                *tensors[1], layer.post_attention_layernorm.weight, *tensors[2], *tensors[3],
            ])
            projections.append([None if d else p.forward for p, d in zip(linears, dense)])
            windows.append(layer.self_attn.attn.sliding_window or 0)
        first = self.model.model.layers[0]
        attn = first.self_attn
        return decode_ops(first.input_layernorm.weight).DecodeLayers(
            layers, projections, list(cache.k_layers), list(cache.v_layers), windows, attn.num_heads,
            attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps, attn.attn.scale)

    def _f32_layers(self, cache: PagedKVCache):
        norms, projections, windows = [], [], []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms.append([layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          attn.q_norm.weight if attn.qk_norm else NONE_F32,
                          attn.k_norm.weight if attn.qk_norm else NONE_F32])
            projections.append([[_part(p) for p in _projections(module, fused, parts, torch.float32)]
                                for module, fused, parts in ((attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                                             (attn, "o_proj", ()),
                                                             (mlp, "gate_up_proj", ("gate_proj", "up_proj")),
                                                             (mlp, "down_proj", ()))])
            windows.append(attn.attn.sliding_window or 0)
        first = self.model.model.layers[0]
        attn = first.self_attn
        return avx2_kernels("decode_f32").DecodeLayersF32(
            norms, projections, list(cache.k_layers), list(cache.v_layers), windows, attn.num_heads,
            attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps, attn.attn.scale,
            avx2_kernels("x16_avx2").x16_matmul_avx2_capsule, avx2_kernels("half_avx2").half_matmul_avx2_capsule,
            avx2_kernels("attention_f32").paged_attention_f32_capsule)

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: [B, hidden] input embeddings -> [B, hidden], the last layer's output (before the final norm)
        cos, sin = self.rope.cos_sin(meta.positions, x.dtype)  # [B, 1, head_dim] each
        return self._layers(meta.kv_cache).forward(x, cos, sin, meta.slot_mapping, meta.positions, meta.block_tables)
