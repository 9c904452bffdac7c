"""Pooling an encoder's token vectors into one embedding per text, as sentence-transformers' Pooling and
Normalize modules do: CLS, max, mean, mean / sqrt(length) and last-token pooling (several at once are
concatenated in that order), then optional L2 normalization and matryoshka truncation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ownllm.config import PoolingConfig


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, config: PoolingConfig,
         dimensions: int | None = None) -> torch.Tensor:
    """hidden: [B, L, H], attention_mask: [B, L] (1 for real tokens, right-padded) -> [B, D] in float32, D the
    modes' total size or `dimensions` (a matryoshka prefix, normalized again when the model normalizes)."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    lengths = mask.sum(1).clamp(min=1)  # [B, 1]
    pooled = []
    for mode in config.modes:
        if mode == "cls":
            pooled.append(hidden[:, 0])
        elif mode == "max":
            pooled.append(hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1))
        elif mode == "mean":
            pooled.append((hidden * mask).sum(1) / lengths)
        elif mode == "mean_sqrt_len":
            pooled.append((hidden * mask).sum(1) / lengths.sqrt())
        else:  # lasttoken
            last = attention_mask.sum(1).long() - 1  # [B]
            pooled.append(hidden[torch.arange(hidden.shape[0]), last])
    vectors = torch.cat(pooled, dim=-1)  # [B, D]
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, dim=-1) if config.normalize else vectors
