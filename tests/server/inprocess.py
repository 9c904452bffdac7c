"""The server in this process: an AsyncEngine on a tiny checkpoint and the app around it, called through
httpx's ASGI transport, for tests that need to reach inside (inject faults, read the KV pool)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ownllm.config import CacheConfig, EngineConfig
from ownllm.engine.async_engine import AsyncEngine

TINY_NAME = "tiny"
KV_CACHE_BYTES = 8 * 2**20


@contextmanager
def inprocess_engine(model: Path, **options) -> Iterator[AsyncEngine]:
    config = EngineConfig(str(model), dtype="float32", cache=CacheConfig(memory_bytes=KV_CACHE_BYTES))
    engine = AsyncEngine.from_config(config, model_name=TINY_NAME, **options)
    try:
        yield engine
    finally:
        engine.shutdown()


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Waits until the engine holds no request and no KV block (its thread may still be tidying up a request that
    just answered); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["num_unfinished"] or stats["kv_blocks_used"] or stats["num_waiting"]:
        assert time.monotonic() < deadline, f"the engine still holds requests or blocks: {stats}"
        time.sleep(0.02)
