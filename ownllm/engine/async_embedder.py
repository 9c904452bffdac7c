"""AsyncEmbedder: an Embedder for the server. Inputs are checked and tokenized at once (so a bad one is refused
before anything waits); the model runs in one worker thread, never on the event loop, and requests that arrive
while a batch runs are embedded together in the next one. Imports no torch.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from ownllm.engine.embedder import EmbedInput, Embedder, EmbeddingOutput


@dataclass
class _Job:
    prompts: list[list[int]]
    dimensions: int | None
    future: asyncio.Future


class AsyncEmbedder:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.model_name = embedder.name
        self._pending: list[_Job] = []
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ownllm-embed")

    async def embed(self, inputs: Sequence[EmbedInput], truncate: bool = False,
                    dimensions: int | None = None) -> list[EmbeddingOutput]:
        """One EmbeddingOutput per input, in order; bad inputs raise ValueError naming them."""
        self.embedder.check_dimensions(dimensions)
        prompts = self.embedder.tokenize(inputs, truncate)
        job = _Job(prompts, dimensions, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run_pending())
        vectors = await job.future
        return [EmbeddingOutput(vector, len(ids)) for vector, ids in zip(vectors, prompts)]

    async def _run_pending(self) -> None:
        """Until nothing waits: the waiting jobs that ask for the oldest one's dimensions, as one call of embed_ids."""
        loop = asyncio.get_running_loop()
        while self._pending:
            dimensions = self._pending[0].dimensions
            jobs = [job for job in self._pending if job.dimensions == dimensions]
            self._pending = [job for job in self._pending if job.dimensions != dimensions]
            prompts = [ids for job in jobs for ids in job.prompts]
            try:
                vectors = await loop.run_in_executor(self._executor, self.embedder.embed_ids, prompts, dimensions)
            except Exception as error:  # reaches every caller in the batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():  # a caller that left has its future cancelled
                    job.future.set_result(vectors[start: start + len(job.prompts)])
                start += len(job.prompts)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
