"""Token embeddings: nn.Embedding's parameter (so HF names load as is), without its random init.

Every weight comes from the checkpoint, and nn.Embedding's normal_ init on the meta device costs 0.8 s
the first time (torch imports its Python decompositions for it), a sixth of the 1B shape's start-up.
A GGUF embedding in one of the block formats (layers/quant.py BlockWeight) may instead stay quantized:
each lookup dequantizes only the rows it needs, so the table is held once, at its file size, even when a
tied lm_head multiplies by it. A 16-bit table under float32 compute (ModelConfig.weight_dtype) stays 16-bit too,
its rows widened as they are looked up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.layers.module import Module
from ownllm.layers.quant import BlockWeight


class Embedding(Module, nn.Embedding):
    quantized: BlockWeight | None = None  # set instead of `weight`
    # what lookups return where the table is kept otherwise than in the compute dtype (quantized blocks, or 16-bit
    # under float32 compute): the compute dtype; None: the table's own
    lookup_dtype: torch.dtype | None = None

    def reset_parameters(self) -> None:  # the checkpoint's weights replace it
        pass

    def set_quantized(self, weight: BlockWeight, dtype: torch.dtype = torch.bfloat16) -> None:
        self.quantized, self.lookup_dtype = weight, dtype
        self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, embedding_dim]
        if self.weight is None:
            return self.quantized.dequantize(self.lookup_dtype, rows=input_ids)
        rows = F.embedding(input_ids, self.weight)
        return rows if self.lookup_dtype is None else rows.to(self.lookup_dtype)
