"""RMSNorm as Llama-family models define it: normalize in float32, scale in the input dtype.
bfloat16 runs as one fused kernel call (kernels/decode_ops.cpp) where the CPU has one.
GemmaRMSNorm: Gemma's, which scales by (1 + weight) in float32 and casts last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.kernels.build import decode_ops
from ownllm.layers.module import Module


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        ops = decode_ops(x)
        if ops is not None and self.weight.dtype == x.dtype:
            return ops.rms_norm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]; the checkpoint's weight is centred on 0 (transformers' Gemma3RMSNorm)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
