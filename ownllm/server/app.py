"""build_app(engine, settings): the FastAPI application around one EngineClient.

It mounts the OpenAI (/v1, with the Responses API at /v1/responses), Anthropic (/v1/messages) and Ollama
(/api) routers, requires the API key on all of them when one is set (`Authorization: Bearer KEY`, or
Anthropic's `x-api-key: KEY`; compared in constant time, never logged), refuses bodies over the size limit, adds
CORS only for the origins the settings allow, answers 503 while it drains for shutdown, serves /health and
/metrics (open, like vLLM's, so probes and scrapers need no key) and the chat page at / (page.py, open too), and
turns every error into the JSON shape of the API that was called: never a traceback, never a hung request.
Request semantics live in openai.py, responses.py, anthropic.py and ollama.py; this module only wires. An
embedding model's routes (embeddings.py) sit beside them, behind the same key.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import ownllm
from ownllm.engine.async_embedder import AsyncEmbedder
from ownllm.server import anthropic, embeddings, ollama, openai, page, responses
from ownllm.server.limits import BodySizeLimit
from ownllm.server.metrics import ServerMetrics
from ownllm.server.schema import describe_request_bodies
from ownllm.server.shutdown import DrainMiddleware
from ownllm.server.serving import ClientDisconnected, EngineClient, ServerContext, ServerError, ServerSettings

logger = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody receives it


def build_app(engine: EngineClient | None, settings: ServerSettings | None = None,
              embedder: AsyncEmbedder | None = None, verifier: EngineClient | None = None) -> FastAPI:
    """engine None: the embedder's model alone (its generation routes answer 400). verifier: the model that scores
    `compute` samples (None: the engine itself)."""
    settings = settings or ServerSettings()
    chat_model_name = engine.model_name if engine is not None else None
    engine = engine if engine is not None else embeddings.EmbeddingOnlyEngine(embedder)
    ctx = ServerContext(engine, settings, ServerMetrics(engine.stats), verifier=verifier)
    app = FastAPI(title="ownllm", version=ownllm.__version__,
                  description="OpenAI-compatible (/v1) and Ollama-compatible (/api) APIs over one model.")
    app.state.ctx = ctx
    auth = [Depends(_require_key(settings.api_key))] if settings.api_key else []
    generation = auth + ([Depends(embeddings.generation_guard(embedder, chat_model_name is not None))]
                         if embedder is not None else [])
    app.include_router(embeddings.router(embedder, chat_model_name), dependencies=auth)
    app.include_router(openai.router(ctx), dependencies=generation)
    app.include_router(responses.router(ctx), dependencies=generation)
    app.include_router(anthropic.router(ctx), dependencies=generation)
    app.include_router(ollama.router(ctx), dependencies=generation)
    app.include_router(page.router())  # open, like the probes: the page holds no secrets, its API calls need the key
    _add_probes(app, ctx)
    _add_error_handlers(app)
    describe_request_bodies(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(DrainMiddleware, drain=ctx.drain, error_response=error_response)
    return app


def _require_key(api_key: str):
    expected = api_key.encode()

    async def require_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        if not secrets.compare_digest(token.strip().encode(), expected):
            raise ServerError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' or "
                              "'x-api-key: <key>'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def _add_probes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        ctx.engine.stats()
        return JSONResponse({"status": "ok", "model": ctx.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = ctx.metrics.render()
        return Response(content, media_type=content_type)


def error_response(request: Request, error: ServerError) -> Response:
    path = request.url.path
    body = (anthropic.error_body(error) if path.startswith("/v1/messages") else
            openai.error_body(error) if path.startswith("/v1") else ollama.error_body(error))
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(request: Request, error: ServerError) -> Response:
        return error_response(request, error)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return error_response(request, ServerError(error.status_code, str(error.detail), headers=error.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_response(request, ServerError(400, f"{param or 'request'}: {first['msg']}", param=param))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(request, ServerError(500, f"internal server error ({type(error).__name__})"))
