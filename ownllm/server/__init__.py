"""The HTTP server: OpenAI- and Ollama-compatible APIs over one EngineClient (FastAPI; `ownllm serve`).

Nothing below ownllm/server imports FastAPI, and nothing here touches tensors: the server turns HTTP
requests into token ids and SamplingParams, and engine outputs into JSON, SSE or NDJSON.
"""

from ownllm.server.app import build_app
from ownllm.server.serving import ServerSettings

__all__ = ["build_app", "ServerSettings"]
