"""LayerBackends: the implementation of every pluggable layer piece, resolved once from BackendConfig's names
when the model runner is built.

The attention backend travels in each forward's AttentionMetadata; the MoE and MLA backends and the quant
method are bound into the model as it loads (models/base.py), so nothing switches them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ownllm.config import BackendConfig
from ownllm.layers.attention import TorchAttention, attention_backend
from ownllm.layers.mla import ExpandedMLA, mla_backend
from ownllm.layers.moe import ReferenceMoE, moe_backend
from ownllm.layers.quant import DequantizedMethod, quant_method


@dataclass(frozen=True)
class LayerBackends:
    attention: TorchAttention
    moe: ReferenceMoE
    mla: ExpandedMLA
    quant: DequantizedMethod

    @classmethod
    def resolve(cls, names: BackendConfig, dtype: torch.dtype, device: str) -> "LayerBackends":
        """Each name looked up in its registry (None: the fastest that runs here); an unknown name is an error
        that lists the known ones."""
        return cls(attention_backend(names.attention, dtype, device), moe_backend(names.moe), mla_backend(names.mla),
                   quant_method(names.quant))
