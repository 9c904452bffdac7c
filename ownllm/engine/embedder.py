"""Embedder: the engine of an embedding model, for `LLM(model).embed(...)` and (through AsyncEmbedder) the server.

It owns what lies between texts and vectors above the tensors: tokenizing (truncating only when asked), refusing
bad inputs in one line that names the input, batching texts of similar length under a token budget, and putting
the vectors back in the caller's order. The tensor work is worker/embedding_runner.py's. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ownllm.config import PoolingConfig, resolve_device
from ownllm.loader.resolve import resolve_model
from ownllm.models.registry import is_embedding_architecture
from ownllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from ownllm.worker.embedding_runner import EmbeddingRunner

EmbedInput = str | Sequence[int]  # a text, or its token ids (used as they are: no special tokens added)


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]
    num_prompt_tokens: int


def is_embedding_model(model: str | None) -> bool:
    """Whether `model` (a path, hub id or name, as LLM takes it) is a checkpoint folder of an embedding architecture.
    Reads config.json only."""
    path = resolve_model(model)
    config_file = path / "config.json"
    if path.suffix == ".gguf" or not config_file.is_file():
        return False
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or [""]
    except json.JSONDecodeError:
        return False  # the loader names the broken file
    return is_embedding_architecture(architectures[0])


class Embedder:
    """max_num_seqs texts at most in one forward, and at most max_num_batched_tokens tokens counting padding."""

    def __init__(self, runner: EmbeddingRunner, tokenizer: Tokenizer, name: str, model_path: Path | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 8192) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.name = name
        self.model_path = model_path
        self.config = runner.config
        self.pooling: PoolingConfig = runner.pooling
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

    @classmethod
    def from_model(cls, model: str, dtype: str | None = None, device: str | None = None, name: str | None = None,
                   **batching: int) -> "Embedder":
        from ownllm.loader import load_checkpoint
        from ownllm.loader.sentence_transformers import read_pooling_config
        from ownllm.worker.embedding_runner import EmbeddingRunner

        device = resolve_device(device)
        checkpoint = load_checkpoint(model, dtype, keep_quantized=device == "cpu")
        if not is_embedding_architecture(checkpoint.config.architecture):
            raise ValueError(f"model {model} ({checkpoint.config.architecture}) is not an embedding model")
        runner = EmbeddingRunner(checkpoint, read_pooling_config(checkpoint.path, checkpoint.config), device)
        return cls(runner, checkpoint.tokenizer, name or str(model), checkpoint.path, **batching)

    @property
    def dimensions(self) -> int:
        """The size of this model's embeddings."""
        return self.config.hidden_size * len(self.pooling.modes)

    @property
    def max_model_len(self) -> int:
        """The longest input in tokens."""
        return self.pooling.max_seq_length

    def tokenize(self, inputs: Sequence[EmbedInput], truncate: bool = False) -> list[list[int]]:
        """Texts or token-id lists -> token ids, each within max_model_len (cut to it when `truncate`, else refused)."""
        if not inputs:
            raise ValueError("input is empty: give at least one text")
        texts = {i: text for i, text in enumerate(inputs) if isinstance(text, str)}
        for i, text in texts.items():
            if not text:
                raise ValueError(f"input {i} is an empty string")
        backend = self.tokenizer.backend
        encoded = dict(zip(texts, backend.encode_batch(list(texts.values()), add_special_tokens=False)))
        num_special = backend.num_special_tokens_to_add(False)
        all_ids = []
        for i, item in enumerate(inputs):
            if i in encoded:
                encoding = encoded[i]
                if truncate and len(encoding.ids) + num_special > self.max_model_len:
                    encoding.truncate(self.max_model_len - num_special)
                ids = backend.post_process(encoding).ids
            else:
                ids = self._checked_ids(i, item)[: self.max_model_len if truncate else None]
            if len(ids) > self.max_model_len:
                raise ValueError(f"input {i} is {len(ids)} tokens, more than the {self.max_model_len} tokens "
                                 f"model {self.name} takes")
            all_ids.append(ids)
        return all_ids

    def _checked_ids(self, index: int, ids: Sequence[int]) -> list[int]:
        vocab_size = self.config.vocab_size
        if not ids:
            raise ValueError(f"input {index} is an empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"input {index}: token ids must be integers in [0, {vocab_size})")
        return list(ids)

    def check_dimensions(self, dimensions: int | None) -> None:
        """Refuses an output size this model was not trained to give (only matryoshka models may shorten)."""
        if dimensions is None or dimensions == self.dimensions:
            return
        allowed = self.pooling.matryoshka_dimensions
        if not self.pooling.is_matryoshka:
            raise ValueError(f"dimensions: model {self.name} gives {self.dimensions}-dimensional embeddings and "
                             "cannot shorten them (it is not a matryoshka model)")
        if not 1 <= dimensions <= self.dimensions or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {self.dimensions}"
            raise ValueError(f"dimensions: model {self.name} gives embeddings of {sizes} dimensions, not {dimensions}")

    def embed_ids(self, prompts: list[list[int]], dimensions: int | None = None) -> list[list[float]]:
        """Token ids (each within max_model_len) -> their embeddings, computed in batches of similar lengths."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        vectors: list[list[float] | None] = [None] * len(prompts)
        start = 0
        while start < len(order):
            longest = len(prompts[order[start]])  # the batch is padded to its first (longest) text
            size = max(1, min(self.max_num_seqs, self.max_num_batched_tokens // longest, len(order) - start))
            batch = order[start: start + size]
            for i, vector in zip(batch, self.runner.embed([prompts[i] for i in batch], dimensions)):
                vectors[i] = vector
            start += size
        return vectors

    def embed(self, inputs: EmbedInput | Sequence[EmbedInput], truncate: bool = False,
              dimensions: int | None = None) -> list[EmbeddingOutput]:
        """One text (or token-id list), or several -> one EmbeddingOutput per input, in order."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        self.check_dimensions(dimensions)
        prompts = self.tokenize(inputs, truncate)
        return [EmbeddingOutput(vector, len(ids)) for vector, ids in zip(self.embed_ids(prompts, dimensions), prompts)]
