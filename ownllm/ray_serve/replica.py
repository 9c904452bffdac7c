"""Replica: one engine and the server app around it (server/launch.py's build_server, the same app `ownllm serve`
runs alone), in its own Ray actor process, as a Ray Serve deployment.

The ingress calls `handle` with each ForwardedRequest and streams back what the app answers (forward.run_app),
with the header x-ownllm-replica naming the replica. The rest serves the ingress and Serve: `routing_info` (the
tokenizer and block size the ingress hashes prompts with), `describe` (id, pid, node), `metrics` (this replica's Prometheus text),
`check_health` (Serve restarts a replica whose engine died), `record_autoscaling_stats` (KV-cache use and waiting
requests for autoscaling.py). Serve's own max_restarts and health checks replace a replica whose process died.
"""

from __future__ import annotations

import os
from typing import AsyncIterator

import ray
from ray import serve

from ownllm.ray_serve.forward import ForwardedRequest, ResponseStart, run_app
from ownllm.server.launch import ServeSpec, build_server

REPLICA_HEADER = "x-ownllm-replica"


class Replica:
    def __init__(self, spec: ServeSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.spec = spec
        self.server = build_server(spec)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.headers = [(REPLICA_HEADER.encode(), self.replica_id.encode())]

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        async for item in run_app(self.server.app, request, self.headers):
            yield item

    def routing_info(self):
        """-> (tokenizer, KV block size): what the ingress needs to hash prompts as this engine does."""
        engine = self.server.engine
        return (engine.tokenizer if engine is not None else None), self.spec.config.cache.block_size

    def describe(self) -> dict:
        """Which replica this is and where it runs (the ingress's /health lists them)."""
        return {"replica": self.replica_id, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "alive": self.server.engine is None or self.server.engine.is_alive}

    def metrics(self) -> tuple[str, bytes]:
        content, _ = self.server.app.state.ctx.metrics.render()
        return self.replica_id, content

    def check_health(self) -> None:
        engine = self.server.engine
        if engine is not None and not engine.is_alive:
            raise RuntimeError("the engine thread has stopped")

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.server.app.state.ctx.engine.stats()
        total = stats.get("kv_blocks_total", 0)
        return {"kv_cache_usage": stats.get("kv_blocks_used", 0) / total if total else 0.0,
                "num_waiting": float(stats.get("num_waiting", 0))}

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
