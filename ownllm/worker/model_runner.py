"""ModelRunner: requests in, sampled tokens out. Owns the model weights and each request's KV cache.

The engine hands it the requests to advance this step and how many tokens each computes; it runs
the model over those tokens, samples the next token from the last position and reports results as
plain Python values, so the engine above it never touches a tensor.
"""

from __future__ import annotations

import torch

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata, SequenceKVCache
from ownllm.loader import Checkpoint
from ownllm.models.registry import model_class
from ownllm.request import Request
from ownllm.worker.sampler import SampleResult, Sampler


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint) -> None:
        self.config: ModelConfig = checkpoint.config
        self.dtype = getattr(torch, self.config.dtype)
        self.model = model_class(self.config.architecture).from_tensors(self.config, checkpoint.tensors)
        self.sampler = Sampler()
        self._caches: dict[str, SequenceKVCache] = {}

    def _cache(self, request_id: str) -> SequenceKVCache:
        if request_id not in self._caches:
            c = self.config
            self._caches[request_id] = SequenceKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype)
        return self._caches[request_id]

    @torch.inference_mode()
    def forward_logits(self, request: Request, num_tokens: int) -> torch.Tensor:
        """Computes the request's next num_tokens tokens into its cache -> logits of the last one: [vocab] float32."""
        start = request.num_computed_tokens
        token_ids = request.all_token_ids[start : start + num_tokens]
        cache = self._cache(request.request_id)
        cache.reserve(start + len(token_ids), start)
        meta = AttentionMetadata(torch.arange(start, start + len(token_ids)), cache)
        hidden = self.model(torch.tensor(token_ids, dtype=torch.long), meta)  # [T, hidden]
        return self.model.compute_logits(hidden[-1:])[0].float()

    def execute(self, requests: list[Request], num_tokens: list[int], stop_ids: list[set[int]]) -> list[SampleResult]:
        logits = torch.stack([self.forward_logits(r, n) for r, n in zip(requests, num_tokens)])  # [B, vocab]
        return self.sampler(logits, requests, stop_ids)

    def free(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        self.sampler.free(request_id)
