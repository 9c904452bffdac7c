"""EmbeddingRunner: token ids of a batch of texts -> one embedding per text, on the encoder model (the data plane
of ownllm.engine.embedder). It pads the batch to its longest text, runs one forward and pools; it keeps no state
between calls (no KV cache, no sampling).
"""

from __future__ import annotations

import torch

from ownllm.config import BackendConfig, PoolingConfig
from ownllm.layers.backends import LayerBackends
from ownllm.layers.pooler import pool
from ownllm.loader import Checkpoint
from ownllm.models.registry import model_class


class EmbeddingRunner:
    def __init__(self, checkpoint: Checkpoint, pooling: PoolingConfig, device: str = "cpu") -> None:
        self.config = checkpoint.config
        self.pooling = pooling
        self.device = device
        backends = LayerBackends.resolve(BackendConfig(), getattr(torch, self.config.dtype), device)
        self.model = model_class(self.config.architecture).from_tensors(self.config, checkpoint.tensors, backends)
        if torch.device(device).type != "cpu":
            self.model.to(device)

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], dimensions: int | None = None) -> list[list[float]]:
        """batch: token ids of each text (special tokens included) -> its embedding (`dimensions` long if given)."""
        length = max(len(ids) for ids in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)  # [B, L], right-padded
        attention_mask = torch.zeros(len(batch), length, dtype=torch.long)  # [B, L]
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.model(input_ids, attention_mask)  # [B, L, hidden]
        return pool(hidden, attention_mask, self.pooling, dimensions).cpu().tolist()
