"""The request bodies in /openapi.json. The generation routes read and validate their bodies themselves (so a
bad body gets each API's own error shape), which hides them from FastAPI's schema; this puts the protocol's
request models back, so clients, docs and fuzzers see what each route accepts. It only describes: nothing
here validates or serves.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ownllm.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from ownllm.server.embeddings import EmbeddingRequest, OllamaEmbeddingsRequest, OllamaEmbedRequest
from ownllm.server.protocol import (
    ChatCompletionRequest, CompletionRequest, OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest,
)
from ownllm.server.responses_protocol import ResponsesRequest

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/api/chat": OllamaChatRequest,
    "/api/generate": OllamaGenerateRequest,
    "/api/show": OllamaShowRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/api/embed": OllamaEmbedRequest,
    "/api/embeddings": OllamaEmbeddingsRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/v1/responses": ResponsesRequest,
}
_REF = "#/components/schemas/{model}"


def describe_request_bodies(app: FastAPI) -> None:
    """Makes app.openapi() list REQUEST_BODIES as the JSON bodies of their POST routes."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in REQUEST_BODIES.items():
                body = model.model_json_schema(ref_template=_REF)
                schemas.update(body.pop("$defs", {}))
                schemas[model.__name__] = body
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": _REF.format(model=model.__name__)}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
