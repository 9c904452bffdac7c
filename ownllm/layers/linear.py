"""Linear layers: nn.Linear's parameters (so HF names load as is), matmuls dispatched by shape.

Decode multiplies a few activation rows by each weight, which is bound by memory bandwidth; for
bfloat16 weights and up to 4 rows the AVX-512 BF16 kernel (kernels/gemv_bf16.cpp) streams each
weight row once. Everything else goes to torch (oneDNN), which is faster for prefill-sized batches.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
GEMV_MAX_ROWS = 4


@functools.cache
def gemv_kernel():
    from ownllm.kernels.build import load

    logger.info("building the bf16 decode kernel (once; cached afterwards)")
    return load("gemv_bf16", ("avx512_bf16", "avx512bw"), ("-mavx512f", "-mavx512bf16", "-mavx512vl", "-mavx512bw"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [T, in] -> [T, out]
    if (x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.is_contiguous() and gemv_kernel() is not None):
        return gemv_kernel().gemv_bf16(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fuse_linears(layers: list[nn.Linear]) -> Linear:
    """One Linear computing several at once (e.g. q, k and v): their output rows stacked in order."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else weight.new_zeros(layer.out_features)
                          for layer in layers])
    with torch.device("meta"):
        fused = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused
