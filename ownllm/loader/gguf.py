"""Loads a llama.cpp GGUF checkpoint as an HF-style config dict, HF-named tensors and a tokenizer.

This module owns the GGUF side of loading: reading the file (memory-mapped by `gguf.GGUFReader`),
turning `{arch}.*` metadata into a config.json-style dict that `ModelConfig.from_hf` accepts,
dequantizing every tensor to the compute dtype, renaming it to the transformers name with the
transformers shape, and undoing the changes llama.cpp's converter makes (the Q/K row permutation of
`llama`-architecture models; the 1 it adds to Gemma 3's norm weights, which transformers' Gemma3RMSNorm adds
at run time). The tokenizer is rebuilt by `gguf_tokenizer`.

Supported: `general.architecture` llama (also Mistral, whose GGUFs say "llama", and Mixtral: "llama" with
`llama.expert_count`), qwen2, qwen3, qwen3moe, llama4 (text) and gemma3 (text); tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (the K-quant mixes, as Q4_K_M, fall back to Q5_0 / Q8_0 where rows
are not multiples of 256). Q2_K and Q3_K are always dequantized at load; the others may stay quantized.
MoE files store each layer's experts as 3-D tensors (`blk.N.ffn_gate_exps` ...); each expert's slice
becomes its HF per-expert tensor (a view, not a copy), and settings llama.cpp hard-codes for Llama 4 are
written into the config; so are those it hard-codes for Gemma 3 (local layers' rope theta and pattern, the
attention scale).

Default compute dtype (`dtype=None`): a file whose weight matrices are all F16 (or all BF16) loads
in that dtype; every other file (F32 or any quantized type) loads in float32 -- dequantized values
are exact in float32, and float32 is what the CPU reference path runs in.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QType

from ownllm.layers.quant import BLOCK_FORMATS, BlockWeight, Int4Weight
from ownllm.loader.gguf_tokenizer import tokenizer_from_metadata

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

_INT4_TYPES = (QType.Q4_0, QType.Q4_1)

# general.architecture -> (HF architectures[0], HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "llama4": ("Llama4ForCausalLM", "llama4_text"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# Architectures whose q/k rows llama.cpp's converter permutes (LlamaModel.modify_tensors, undo_permute=True).
PERMUTED_ARCHITECTURES = frozenset({"llama"})

SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
)
_FLOAT_DTYPES = {QType.F16: torch.float16, QType.BF16: torch.bfloat16}

# GGUF tensor name -> HF name. `{n}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
# Where an architecture names a layer tensor otherwise: Gemma 3's four norms per layer.
_ARCH_LAYER_NAMES = {
    "Gemma3ForCausalLM": {
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
# Architectures whose norm weights llama.cpp's converter stores plus 1 (Gemma3Model.modify_tensors, norm_shift).
SHIFTED_NORM_ARCHITECTURES = frozenset({"gemma3"})
_REQUIRED_LAYER_TENSORS = (
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# MoE layers: the router, the experts as 3-D [E, out, in] tensors, and (Llama 4) the shared expert.
_MOE_LAYER_TENSORS = (
    "ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
    "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight",
)
# HF architecture -> (feed-forward module name, router name, per-expert gate/up/down names)
_MOE_LAYOUT = {
    "MixtralForCausalLM": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "Llama4ForCausalLM": ("feed_forward", "router", ("gate_proj", "up_proj", "down_proj")),
}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-dimension factors

_GGUF_MAGIC = b"GGUF"
_UINT64 = struct.Struct("<Q")
_MAX_LISTED_ARRAY = 64  # metadata arrays longer than this (the vocabulary...) stay out of `metadata`


@dataclass
class GGUFCheckpoint:
    hf_config: dict  # config.json-style; see hf_config_from_metadata
    tensors: dict[str, torch.Tensor]  # HF names and shapes, in the compute dtype
    tokenizer: "Tokenizer"
    metadata: dict  # the file's scalar metadata (and short arrays), for `ownllm models` and debugging


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None, keep_quantized: bool = False,
              reader: gguf.GGUFReader | None = None, with_tensors: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file into HF-named tensors of `dtype` (None: see the module docstring's rule).
    keep_quantized: Q4_0 / Q4_1 matrices (other than the embedding) stay 4-bit, as layers.quant.Int4Weight,
    and Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K ones (the embedding too) stay the file's blocks, as
    layers.quant.BlockWeight; so do MoE experts, one such weight per expert.
    reader: the file's open_gguf() reader, when the caller has parsed it already. with_tensors False: the config
    and tokenizer only (e.g. for an engine whose tensor-parallel workers load the weights)."""
    path = os.fspath(path)
    reader = reader or open_gguf(path)
    fields = read_fields(reader)
    arch = _architecture(fields)
    _check_tensor_types(reader)
    compute_dtype = dtype or default_dtype(reader)
    names = {t.name for t in reader.tensors}
    hf_config = hf_config_from_metadata(fields, reader, compute_dtype)
    architecture = hf_config["architectures"][0]
    _check_tensor_names(names, hf_config["num_hidden_layers"], architecture)
    tokenizer = tokenizer_from_metadata(fields)  # before the slow part, so a bad vocabulary fails fast
    tensors, moe = {}, {}
    for tensor in reader.tensors if with_tensors else ():
        if tensor.name == _ROPE_FREQS:
            continue  # folded into hf_config["rope_scaling"]
        if _is_moe_tensor(tensor.name):
            kept = None
            if keep_quantized and "_gate_inp" not in tensor.name:  # the router stays dense
                kept = _kept_quantized_experts(tensor) if len(tensor.shape) == 3 else _kept_quantized(tensor)
            moe[tensor.name] = kept if kept is not None else dequantize_tensor(tensor, compute_dtype)
            continue
        hf_name = hf_tensor_name(tensor.name, architecture)
        if keep_quantized and (weight := _kept_quantized(tensor)) is not None:
            tensors[hf_name] = weight.map_rows(lambda rows: unpermute_qk(rows, tensor.name, arch, hf_config))
            continue
        if arch in SHIFTED_NORM_ARCHITECTURES and tensor.name.endswith("norm.weight"):
            tensors[hf_name] = (dequantize_tensor(tensor, torch.float32) - 1.0).to(compute_dtype)
            continue
        value = dequantize_tensor(tensor, compute_dtype)
        tensors[hf_name] = unpermute_qk(value, tensor.name, arch, hf_config)
    tensors.update(moe_hf_tensors(moe, architecture))
    return GGUFCheckpoint(
        hf_config=hf_config,
        tensors=tensors,
        tokenizer=tokenizer,
        metadata={k: v for k, v in fields.items() if not isinstance(v, list) or len(v) <= _MAX_LISTED_ARRAY},
    )


def _is_kept(kind: QType) -> bool:
    return kind in _INT4_TYPES or kind in BLOCK_FORMATS


def _quantized(blocks: np.ndarray, shape: tuple[int, int], kind: QType) -> Int4Weight | BlockWeight:
    """blocks [out, bytes per row] of a kept type -> the weight its kernel multiplies."""
    if kind in _INT4_TYPES:
        return Int4Weight.from_gguf_blocks(blocks, shape, kind == QType.Q4_1)
    return BlockWeight.from_gguf_blocks(blocks, shape, kind)


def _kept_quantized(tensor: gguf.ReaderTensor) -> Int4Weight | BlockWeight | None:
    """The matrix as the quantized kernels multiply it (Q4_0 / Q4_1 other than the embedding; the
    BLOCK_FORMATS), else None."""
    if len(tensor.shape) != 2 or not _is_kept(tensor.tensor_type):
        return None
    if tensor.tensor_type in _INT4_TYPES and tensor.name == "token_embd.weight":
        return None
    return _quantized(tensor.data, _hf_shape(tensor), tensor.tensor_type)


def _kept_quantized_experts(tensor: gguf.ReaderTensor) -> list[Int4Weight | BlockWeight] | None:
    """A 3-D expert tensor [E, out, in] as the quantized kernels multiply it, one weight per expert (views of
    the file's blocks for the BLOCK_FORMATS), else None."""
    if not _is_kept(tensor.tensor_type):
        return None
    experts, rows, cols = _hf_shape(tensor)
    data = tensor.data.reshape(experts, rows, -1)  # [E, out, bytes per row]
    return [_quantized(data[e], (rows, cols), tensor.tensor_type) for e in range(experts)]


# --- reading -------------------------------------------------------------------------------------


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader whose slices are plain ndarray views of its memmap: np.memmap's Python-level
    __getitem__ / __array_finalize__ ran ~2M times parsing the bundled model's vocabulary (1.6 s of
    start-up; 0.5 s this way, the same fields and tensors). Arrays of numbers or strings in the file's own
    byte order are read in one pass, not one recursive call and 2-3 views per element (0.5 s -> 0.05 s for the
    bundled vocabulary and merges): numbers as one array part; strings decoded as they are read, from bytes
    copied a window at a time (no view per string: 0.17 s -> 0.06 s for the same vocabulary and merges, with
    contents()), kept as one part that their field's contents() returns (_StringArrayField)."""

    window_bytes = 1 << 20  # how much of the file _read_strings copies at a time

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        kind = gguf.GGUFValueType(item_type[0])
        parts = [item_type, count]
        if kind == gguf.GGUFValueType.STRING:
            strings, end = self._read_strings(orig_offs + 12, int(count[0]))
            return end - orig_offs, parts + [strings], [2], [gguf.GGUFValueType.ARRAY, kind]
        scalar = self.gguf_scalar_to_np.get(kind)
        if scalar is None:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(orig_offs + 12, scalar, count[0])
        return 12 + values.nbytes, parts + [values], [2], [gguf.GGUFValueType.ARRAY, kind]

    def _read_strings(self, offset: int, count: int) -> tuple[list[str], int]:
        """`count` GGUF strings (a little-endian uint64 length, then UTF-8 bytes) from `offset` -> (the strings,
        the offset after them)."""
        strings, buf, pos = [], b"", 0  # buf: a window of the file's bytes, from offset
        read_size = _UINT64.unpack_from
        for _ in range(count):
            if pos + 8 > len(buf):
                offset, pos, buf = offset + pos, 0, self._window(offset + pos, 8)
            end = pos + 8 + read_size(buf, pos)[0]
            if end > len(buf):
                offset, end, buf = offset + pos, end - pos, self._window(offset + pos, end - pos)
                pos = 0
            strings.append(buf[pos + 8 : end].decode("utf-8"))
            pos = end
        return strings, offset + pos

    def _window(self, offset: int, size: int) -> bytes:
        """At least `size` bytes of the file from `offset` (window_bytes when the file has them)."""
        buf = self._plain[offset : offset + max(size, self.window_bytes)].tobytes()
        if len(buf) < size:
            raise ValueError(f"a string at byte {offset} runs past the end of the file")
        return buf

    def _push_field(self, field: gguf.ReaderField, skip_sum: bool = False) -> int:
        if field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING] and isinstance(field.parts[-1], list):
            field = _StringArrayField(*field)
        return super()._push_field(field, skip_sum)


class _StringArrayField(gguf.ReaderField):
    """A string array that _Reader decoded while parsing: its last part is the list of strings, which contents()
    returns (its parts hold no per-string byte views)."""

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        return self.parts[-1][index_or_slice]


def open_gguf(path: str) -> gguf.GGUFReader:
    """A GGUFReader over `path`, or ValueError naming the path when it is not a (complete) GGUF file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        reader = _Reader(path, mode="c")  # copy-on-write: tensors may view it, nothing writes back
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError) as e:
        raise ValueError(f"{path} is a truncated or corrupt GGUF file: {e}") from e
    size = reader.data.shape[0]
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(
                f"{path} is a truncated GGUF file: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes"
            )
    return reader


def read_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key -> its value (str, int, float, bool, or a list of those)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _architecture(fields: dict[str, Any]) -> str:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} (general.architecture) is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def _check_tensor_types(reader: gguf.GGUFReader) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, which is not supported; "
                f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )


def default_dtype(reader: gguf.GGUFReader) -> torch.dtype:
    """float16/bfloat16 when every weight matrix is stored so, else float32 (F32 or quantized files)."""
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) >= 2}
    if len(kinds) == 1 and (kind := next(iter(kinds))) in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[kind]
    return torch.float32


# --- config --------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _uniform(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    """A per-model value; llama.cpp allows per-layer arrays, which must all agree here."""
    value = fields.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF {key} differs between layers ({value}); per-layer shapes are not supported")
        value = value[0]
    return value


def _require(fields: dict[str, Any], key: str) -> Any:
    if key not in fields:
        raise ValueError(f"GGUF metadata lacks {key}")
    return _uniform(fields, key)


def hf_config_from_metadata(fields: dict[str, Any], reader: gguf.GGUFReader, dtype: torch.dtype) -> dict:
    """The config.json-style dict for this file (keys as transformers' Llama/Qwen2/Qwen3/Mixtral/Qwen3-MoE/
    Llama 4 text configs)."""
    arch = _architecture(fields)
    architecture, model_type = ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(_require(fields, f"{arch}.embedding_length"))
    heads = int(_require(fields, f"{arch}.attention.head_count"))
    kv_heads = int(_uniform(fields, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_uniform(fields, f"{arch}.attention.key_length", hidden // heads))
    rotary_dim = int(_uniform(fields, f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF {arch}.rope.dimension_count is {rotary_dim} but head_dim is {head_dim}; partial rotary "
            "embeddings are not supported"
        )
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": _vocab_size(fields, tensors, arch),
        "hidden_size": hidden,
        "intermediate_size": int(_require(fields, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(fields, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_require(fields, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_require(fields, f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_scaling": _rope_scaling(fields, arch, reader, head_dim),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch != "qwen2":  # Qwen2ForCausalLM always has q/k/v biases and never an o_proj one
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if "blk.0.ffn_up.bias" in tensors:
        config["mlp_bias"] = True
    if (window := fields.get(f"{arch}.attention.sliding_window")) is not None:
        config["sliding_window"] = int(window)
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if name in fields:
            config[key] = int(fields[name])
    config.update(_moe_config(fields, arch, config))
    if arch == "gemma3":
        config.update(_gemma3_config(fields, config))
    return config


def _gemma3_config(fields: dict[str, Any], config: dict) -> dict:
    """What llama.cpp hard-codes for gemma3 (llama-model.cpp) as HF config keys: local layers rotate with theta
    10000 and every 6th layer is global (unless the file lists the pattern); the attention scale is head_dim**-0.5,
    except for the 27B (62 layers), where it is (hidden_size / heads)**-0.5; the final logits soft-capped if the
    file says so."""
    gemma: dict[str, Any] = {"rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
                             "query_pre_attn_scalar": config["head_dim"]}
    if config["num_hidden_layers"] == 62:
        gemma["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    pattern = fields.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: true for a sliding-window layer
        gemma["layer_types"] = ["sliding_attention" if is_local else "full_attention" for is_local in pattern]
    else:
        gemma["sliding_window_pattern"] = int(pattern or 6)
    if (cap := fields.get("gemma3.final_logit_softcapping")) is not None:
        gemma["final_logit_softcapping"] = _f32(cap)
    return gemma


def _moe_config(fields: dict[str, Any], arch: str, config: dict) -> dict:
    """The MoE keys of the HF config: experts and their width; for Llama 4 also its dense width and the
    attention settings llama.cpp hard-codes (chunks of 8192 on RoPE layers, NoPE every 4th layer, q/k norm
    except on the 128-expert model), or, when the file sets sliding_window 0, RoPE and full attention everywhere."""
    num_experts = int(_uniform(fields, f"{arch}.expert_count", 0) or 0)
    if not num_experts:
        return {}
    moe: dict[str, Any] = {"num_experts_per_tok": int(_require(fields, f"{arch}.expert_used_count"))}
    if arch == "llama":
        return {**moe, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": num_experts}
    if arch == "qwen3moe":
        width = int(_require(fields, f"{arch}.expert_feed_forward_length"))
        return {**moe, "num_experts": num_experts, "moe_intermediate_size": width, "norm_topk_prob": True}
    if arch != "llama4":
        raise ValueError(f"GGUF {arch}.expert_count is set, but {arch} mixture-of-experts files are not supported")
    full_attention = fields.get(f"{arch}.attention.sliding_window") == 0
    layers = config["num_hidden_layers"]
    return {
        **moe, "num_local_experts": num_experts, "intermediate_size_mlp": config["intermediate_size"],
        "intermediate_size": int(_require(fields, f"{arch}.expert_feed_forward_length")),
        "interleave_moe_layer_step": int(fields.get(f"{arch}.interleave_moe_layer_step", 1)),
        "use_qk_norm": num_experts != 128, "sliding_window": None,
        "attention_chunk_size": None if full_attention else 8192,
        "no_rope_layers": [1] * layers if full_attention else [int((i + 1) % 4 != 0) for i in range(layers)],
    }


def _vocab_size(fields: dict[str, Any], tensors: dict[str, Any], arch: str) -> int:
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].shape[-1])  # ne = [hidden, vocab]
    if f"{arch}.vocab_size" in fields:
        return int(fields[f"{arch}.vocab_size"])
    return len(fields.get("tokenizer.ggml.tokens") or ())


def _rope_scaling(fields: dict[str, Any], arch: str, reader: gguf.GGUFReader, head_dim: int) -> dict | None:
    """HF rope_scaling from `{arch}.rope.scaling.*`, or from a rope_freqs tensor (llama3 scaling, which
    llama.cpp stores only as per-dimension factors, not as metadata)."""
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn" and factor:
        scaling = {"rope_type": "yarn", "factor": _f32(factor)}
        if (orig := fields.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        yarn_keys = (
            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("attention_factor", "yarn_attn_factor")
        )
        for key, name in yarn_keys:
            if (value := fields.get(f"{arch}.rope.scaling.{name}")) is not None:
                scaling[key] = _f32(value)
        return scaling
    if kind not in (None, "none") and factor:
        raise ValueError(f"GGUF rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported")
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if rope_freqs is not None:
        theta = float(fields.get(f"{arch}.rope.freq_base", 10000.0))
        return llama3_scaling_from_factors(_to_numpy_f32(rope_freqs), head_dim, theta)
    return None


# The llama3 parameters every Llama 3.x checkpoint uses; only the factor (8 for 3.1, 32 for 3.2) varies.
_LLAMA3_CANDIDATES = tuple((1.0, 4.0, ctx) for ctx in (8192, 4096, 16384, 32768, 2048, 65536, 131072))


def llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """rope_freqs as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes them. [head_dim // 2]"""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """The HF llama3 rope_scaling dict whose per-dimension factors are `factors`, or ValueError."""
    factors = factors.reshape(-1)
    factor = float(factors.max())
    for low, high, old_ctx in _LLAMA3_CANDIDATES:
        expected = llama3_factors(head_dim, theta, factor, low, high, old_ctx)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-5, atol=0):
            return {
                "rope_type": "llama3",
                "factor": _f32(factor),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_ctx,
            }
    raise ValueError(
        f"GGUF tensor {_ROPE_FREQS!r} holds RoPE factors that match no known llama3 rope scaling "
        "(low_freq_factor=1, high_freq_factor=4); custom per-dimension RoPE factors are not supported"
    )


# --- tensors -------------------------------------------------------------------------------------


def hf_tensor_name(name: str, architecture: str = "LlamaForCausalLM") -> str:
    """GGUF tensor name -> transformers name (ValueError for a tensor this loader does not know). MoE tensors
    are named by moe_hf_tensors; Llama 4 calls its MLP `feed_forward`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match and (match.group(2) in _LAYER_NAMES or match.group(2) in _ARCH_LAYER_NAMES.get(architecture, {})):
        hf_name = _ARCH_LAYER_NAMES.get(architecture, {}).get(match.group(2)) or _LAYER_NAMES[match.group(2)]
        if architecture == "Llama4ForCausalLM":
            hf_name = hf_name.replace("mlp.", "feed_forward.")
        return f"model.layers.{match.group(1)}.{hf_name}"
    raise ValueError(
        f"GGUF tensor {name!r} is not one this loader knows (supported: llama/qwen2/qwen3/qwen3moe/llama4/gemma3 decoder tensors)"
    )


def _is_moe_tensor(name: str) -> bool:
    match = _LAYER_RE.fullmatch(name)
    return match is not None and match.group(2) in _MOE_LAYER_TENSORS


def moe_hf_tensors(moe: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """A file's MoE tensors (GGUF name -> value in HF dimension order; experts [E, out, in], or a list of E
    quantized weights) -> the architecture's HF tensors."""
    if not moe:
        return {}
    if architecture not in _MOE_LAYOUT:
        raise ValueError(f"GGUF expert tensors ({next(iter(moe))!r}...) are not supported for {architecture}")
    ffn, router, per_expert = _MOE_LAYOUT[architecture]
    out = {}
    for name, value in moe.items():
        layer, kind = _LAYER_RE.fullmatch(name).groups()
        prefix = f"model.layers.{layer}.{ffn}."
        role = kind.split(".")[0].removeprefix("ffn_")  # gate_inp, gate_exps, ..., down_shexp
        if role == "gate_inp":
            out[f"{prefix}{router}.weight"] = value
        elif role.endswith("_shexp"):
            out[f"{prefix}shared_expert.{role.removesuffix('_shexp')}_proj.weight"] = value
        else:  # value: [E, out, in], or a list of E quantized [out, in]
            projection = per_expert[("gate_exps", "up_exps", "down_exps").index(role)]
            out.update((f"{prefix}experts.{e}.{projection}.weight", value[e]) for e in range(len(value)))
    return out


def _check_tensor_names(names: Iterable[str], num_layers: int, architecture: str = "LlamaForCausalLM") -> None:
    names = set(names)
    for name in sorted(names):
        if name != _ROPE_FREQS and not _is_moe_tensor(name):
            hf_tensor_name(name, architecture)  # raises for unknown names
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in names]
    for i in range(num_layers):
        sparse = f"blk.{i}.ffn_gate_exps.weight" in names
        required = [n for n in _REQUIRED_LAYER_TENSORS if not (sparse and n.startswith("ffn_") and n != "ffn_norm.weight")]
        if sparse:
            required += ["ffn_gate_inp.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"]
        missing += [f"blk.{i}.{n}" for n in required if f"blk.{i}.{n}" not in names]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"GGUF file lacks tensors: {shown}")


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first (ggml's ne order); HF's [out, in] is the reverse.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _to_numpy_f32(tensor: gguf.ReaderTensor) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, cols] float32
    return np.asarray(values, dtype=np.float32).reshape(_hf_shape(tensor))


def dequantize_tensor(tensor: gguf.ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of `dtype` in HF's shape: a view of the (copy-on-write) file
    mapping when the file stores it in `dtype`, so pages are read only when used (the file must not be
    rewritten while a model uses it, as with any mmap); else a new tensor."""
    shape = _hf_shape(tensor)
    kind = tensor.tensor_type
    if kind in (QType.F32, QType.F16):
        # reader data is already float32/float16, laid out as `shape`
        value = torch.from_numpy(tensor.data).reshape(shape)
    elif kind == QType.BF16:
        # raw bytes -> int16 words -> bfloat16 bit pattern
        value = torch.from_numpy(tensor.data.view(np.int16)).view(torch.bfloat16).reshape(shape)
    else:
        value = torch.from_numpy(_to_numpy_f32(tensor))
    return value.to(dtype)


def unpermute_qk(value: torch.Tensor, gguf_name: str, arch: str, hf_config: dict) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `LlamaModel.permute` on q/k weights and biases of llama models.

    The converter reorders each head's rows from HF's rotate_half layout (first half, second half) to
    llama.cpp's interleaved pairs: w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2).
    """
    if arch not in PERMUTED_ARCHITECTURES:
        return value
    suffix = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else ""
    if suffix in ("attn_q.weight", "attn_q.bias"):
        n_head = hf_config["num_attention_heads"]
    elif suffix in ("attn_k.weight", "attn_k.bias"):
        n_head = hf_config["num_key_value_heads"]
    else:
        return value
    rows = value.shape[0]
    # [rows, ...] -> [n_head, rows_per_head // 2, 2, ...] -> [n_head, 2, rows_per_head // 2, ...] -> [rows, ...]
    pairs = value.reshape(n_head, rows // n_head // 2, 2, *value.shape[1:])
    return pairs.transpose(1, 2).reshape(value.shape).contiguous()


__all__ = ["GGUFCheckpoint", "load_gguf", "hf_config_from_metadata", "hf_tensor_name", "moe_hf_tensors", "unpermute_qk"]
