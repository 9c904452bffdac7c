"""ServeSpec and build_server: everything `ownllm serve` needs to make its app, as plain picklable data, and the one
function that loads the engine (and the embedding model) and builds the FastAPI app from it.

The serving process builds its server with it, and so does every Ray Serve replica (ownllm.ray_serve), so one
process and many replicas serve the same routes through the same code. Checking options and resolving model names
stay in the CLI; this module only builds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastapi import FastAPI

from ownllm.config import EngineConfig
from ownllm.server.serving import ServerSettings


@dataclass(frozen=True)
class ServeSpec:
    """config.model is a resolved path, and so is config.mmproj (the vision projector beside a GGUF model) when set;
    embedding_model and verifier_model are (resolved path, served name) or None."""

    config: EngineConfig
    name: str
    settings: ServerSettings
    max_waiting: int | None = None
    embedding_model: tuple[str, str] | None = None
    verifier_model: tuple[str, str] | None = None  # scores `compute` samples (None: the served model)


@dataclass
class Server:
    app: FastAPI
    engine: object | None  # AsyncEngine, None when an embedding model is served alone
    embedder: object | None  # AsyncEmbedder
    verifier: object | None = None  # AsyncEngine

    def shutdown(self) -> None:
        for running in (self.engine, self.embedder, self.verifier):
            if running is not None:
                running.shutdown()


def build_server(spec: ServeSpec) -> Server:
    """Loads the model(s) of `spec` and builds the app around them."""
    from ownllm.engine.async_embedder import AsyncEmbedder
    from ownllm.engine.async_engine import AsyncEngine
    from ownllm.engine.embedder import Embedder, is_embedding_model
    from ownllm.server.app import build_app

    config = spec.config
    engine = embedder = None
    if is_embedding_model(config.model):
        if spec.embedding_model:
            raise ValueError(f"--model {config.model} is an embedding model; --embedding-model goes beside a chat "
                             "model")
        if config.tensor_parallel_size > 1:
            raise ValueError("--tensor-parallel-size does not apply to embedding models")
        if config.mmproj:
            raise ValueError("--mmproj goes with a vision model's text GGUF, not with an embedding model")
        if spec.verifier_model:
            raise ValueError("--verifier-model needs a chat model to verify (--model is an embedding model)")
        embedder = AsyncEmbedder(Embedder.from_model(config.model, config.dtype, config.device, spec.name))
    else:
        engine = AsyncEngine.from_config(config, spec.max_waiting, spec.name)
    if spec.embedding_model:
        path, name = spec.embedding_model
        embedder = AsyncEmbedder(Embedder.from_model(path, None, config.device, name))
    verifier = None
    if spec.verifier_model:
        path, name = spec.verifier_model
        verifier = AsyncEngine.from_config(replace(config, model=path, speculative=None), spec.max_waiting, name)
    return Server(build_app(engine, spec.settings, embedder, verifier), engine, embedder, verifier)
