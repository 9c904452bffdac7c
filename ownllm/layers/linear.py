"""Linear layers: nn.Linear's parameters (so HF names load as is), matmuls dispatched by shape.

Decode multiplies a few activation rows by each weight, which is bound by memory bandwidth; for
bfloat16 weights and up to 32 rows the AVX-512 BF16 kernel (kernels/gemv_bf16.cpp) streams each
weight row once, and gives each row the same numbers in any batch of up to 32 rows. Larger batches
(prefill, or decodes beside a prompt chunk) go to torch (oneDNN), which is faster there and rounds differently.
On CPUs without AVX-512 BF16, a 16-bit checkpoint computes in float32 with its weights kept 16-bit
(ModelConfig.weight_dtype): kernels/half_avx2.cpp widens them in registers, every batch.
A Linear may instead hold a GGUF file's quantized weights as they are kept (layers/quant.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.kernels.build import GEMV_MAX_ROWS, bf16_kernels, on_bf16_cpu
from ownllm.layers.module import Module
from ownllm.layers.quant import QuantizedWeight
from ownllm.layers.quant_avx2 import float32_kernel

HALF_DTYPES = (torch.bfloat16, torch.float16)


def gemv_kernel():
    return bf16_kernels("gemv_bf16")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., in] -> [..., out]
    if (x.dtype == torch.float32 and weight.dtype in HALF_DTYPES and x.is_cpu  # ModelConfig.weight_dtype
            and (kernel := float32_kernel("half_avx2")) is not None):
        out = kernel.half_matmul_avx2(x.reshape(-1, x.shape[-1]), weight, bias)  # [T, out]
        return out.view(*x.shape[:-1], weight.shape[0])
    if (x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and on_bf16_cpu(x)
            and weight.dtype == torch.bfloat16 and weight.is_contiguous() and gemv_kernel() is not None):
        return gemv_kernel().gemv_bf16(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(Module, nn.Linear):
    quantized: QuantizedWeight | None = None  # set instead of `weight` for quantized weights, packed by finalize()
    keep_file_layout = False  # True: block-quantized weights stay the loaded bytes (views of the file), not repacked

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # a model built to load a checkpoint: kaiming init there is wasted (30 ms, 135M)
            return
        super().reset_parameters()

    def set_quantized(self, weight: QuantizedWeight) -> None:
        self.quantized = weight
        self.weight = None

    def finalize(self, dtype: torch.dtype) -> None:
        """After loading (and fusing): puts quantized weights in their kernel's layout."""
        if self.quantized is not None:
            self.packed = self.quantized.packed(dtype, repack=not self.keep_file_layout)
            self.quantized = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.packed.matmul(x, self.bias)
        return linear(x, self.weight, self.bias)


def fuse_linears(layers: list[Linear]) -> Linear | None:
    """One Linear computing several at once (e.g. q, k and v): their output rows stacked in order.
    None when their weights are stored differently (e.g. 4-bit and dense, or Q4_K and Q6_K blocks), which
    cannot be stacked."""
    kinds = {type(layer.quantized) for layer in layers}
    if len(kinds) > 1:
        return None
    quantized = None
    if layers[0].quantized is not None:
        quantized = kinds.pop().cat([layer.quantized for layer in layers])
        if quantized is None:
            return None  # e.g. Q4_K and Q6_K blocks
    with torch.device("meta"):
        fused = Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                       bias=any(layer.bias is not None for layer in layers))
    if quantized is not None:
        fused.set_quantized(quantized)
    else:
        fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
    if fused.bias is not None:
        dtype = next(layer.bias.dtype for layer in layers if layer.bias is not None)
        fused.bias = nn.Parameter(torch.cat([
            layer.bias if layer.bias is not None else torch.zeros(layer.out_features, dtype=dtype) for layer in layers
        ]), requires_grad=False)
    return fused
