"""Checkpoint formats -> (ModelConfig, HF-named tensors, Tokenizer), whatever the source.

`load_checkpoint(model)` accepts a Hugging Face checkpoint folder, a hub id (via huggingface_hub's
cache, downloading only when online), a .gguf file, the name of the bundled model, or None for it. A .gguf text model
may come with llama.cpp's vision projector file (`mmproj`, loader/mmproj.py): the two load as one multimodal
checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ownllm.config import ModelConfig, normalize_dtype
from ownllm.loader.resolve import resolve_model

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from ownllm.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: Mapping[str, "torch.Tensor"]  # HF parameter names
    tokenizer: "Tokenizer"
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # image preprocessing, preprocessor_config.json-style: a folder's file, or what an mmproj file says
    preprocessor_config: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(model: str | None, dtype: str | None = None, keep_quantized: bool = True,
                    with_tensors: bool = True, mmproj: str | None = None) -> Checkpoint:
    """keep_quantized: a GGUF's quantized weights may stay so for our CPU kernels (in bfloat16); False
    dequantizes them all (for a GPU). with_tensors False: a GGUF's weights are not read (a safetensors folder's
    are read only on access anyway). mmproj: a llama.cpp vision projector file for a .gguf text model."""
    path = resolve_model(model)
    if mmproj is not None and path.suffix != ".gguf":
        raise ValueError(f"--mmproj goes with a .gguf text model, but {model} is a checkpoint folder; a Hugging Face "
                         "checkpoint folder carries its vision tower itself")
    if path.suffix == ".gguf":
        from ownllm.loader.gguf import load_gguf, open_gguf

        reader = open_gguf(str(path))  # parsed once: the vocabulary makes it the slow part of start-up
        dtype = dtype or (_quantized_gguf_dtype(reader) if keep_quantized else None)
        gguf = load_gguf(path, dtype=_torch_dtype(dtype), reader=reader,
                         keep_quantized=keep_quantized and _kernels_compute_in(normalize_dtype(dtype)),
                         with_tensors=with_tensors)
        if mmproj is None:
            config = ModelConfig.from_hf(gguf.hf_config, dtype)
            return Checkpoint(_with_half_weights(config) if keep_quantized else config, gguf.tensors, gguf.tokenizer,
                              {}, path)
        from ownllm.loader.mmproj import load_mmproj, multimodal_checkpoint

        projector = load_mmproj(mmproj)
        hf_config, tensors = multimodal_checkpoint(gguf.hf_config, gguf.tensors, projector, gguf.tokenizer,
                                                   str(model), str(mmproj))
        return Checkpoint(ModelConfig.from_hf(hf_config, dtype), tensors, gguf.tokenizer, {}, path,
                          projector.preprocessor_config)
    from ownllm.loader.hf import load_hf_folder

    checkpoint = load_hf_folder(path, dtype)
    if keep_quantized:
        checkpoint.config = _with_half_weights(checkpoint.config)
    return checkpoint


def _with_half_weights(config: ModelConfig) -> ModelConfig:
    """A bfloat16 or float16 model on a CPU without 16-bit arithmetic (AVX2, no AVX-512 BF16) computes in float32,
    its Linear weights and token embedding kept 16-bit and widened in registers by kernels/half_avx2.cpp: the
    weights are read at their 2 bytes, where torch's emulated 16-bit math ran at a third of llama.cpp's F16 speed."""
    if config.dtype not in ("bfloat16", "float16"):
        return config
    from ownllm.layers.quant_avx2 import float32_kernel

    if float32_kernel("half_avx2") is None:
        return config
    logger.info("%s weights, float32 compute (this CPU has no 16-bit arithmetic)", config.dtype)
    return dataclasses.replace(config, dtype="float32", weight_dtype=config.dtype)


def _quantized_gguf_dtype(reader) -> str | None:
    """Quantized GGUF files run in bfloat16 with 4-bit and 8-bit kernels where the CPU multiplies bfloat16 natively
    (AVX-512 BF16), in float32 with the AVX2 kernel elsewhere (layers/quant_avx2.py); plain files follow
    gguf.default_dtype."""
    from gguf import GGMLQuantizationType as QType

    from ownllm.kernels.build import cpu_has_bf16

    plain = {QType.F32, QType.F16, QType.BF16}
    quantized = any(t.tensor_type not in plain for t in reader.tensors if len(t.shape) == 2)
    return None if not quantized else "bfloat16" if cpu_has_bf16() else "float32"


def _kernels_compute_in(dtype: str | None) -> bool:
    """Whether quantized weights stay quantized for compute in `dtype`: bfloat16, or float32 where the AVX2 kernel
    runs (and the AVX-512 ones do not)."""
    if dtype == "float32":
        from ownllm.layers.quant_avx2 import float32_kernel

        return float32_kernel() is not None
    return dtype == "bfloat16"


def _torch_dtype(dtype: str | None):
    name = normalize_dtype(dtype)
    if name is None:
        return None
    import torch

    return getattr(torch, name)
