"""The ingress: one HTTP app in front of the replicas. It serves /health and /metrics itself (gathered from every
replica) and forwards every other request, unread but for its prompt's block hashes (prefix_key.py), through the
DeploymentHandle to the replica the router picks; what the replica's app answers (the very routes `ownllm serve`
has alone) streams back as it comes.

A replica that fails before its answer starts gives the client 503 (Retry-After) in the called API's error shape;
one that fails mid-stream ends the stream with the API's in-stream error event (OpenAI and Anthropic SSE, Ollama
NDJSON), so a client never waits on a dead replica. A client that leaves cancels the replica's work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ownllm.ray_serve.forward import ForwardedRequest, ResponseStart
from ownllm.ray_serve.metrics import aggregate
from ownllm.ray_serve.prefix_key import request_prefix_hashes
from ownllm.server import anthropic, ollama, openai
from ownllm.server.app import CLIENT_CLOSED_REQUEST, error_response
from ownllm.server.errors import ServerError
from ownllm.server.limits import BodySizeLimit
from ownllm.server.responses_protocol import ErrorEvent
from ownllm.server.serving import ClientDisconnected, ClosingStreamingResponse, ServerSettings, until_disconnect
from ownllm.server.shutdown import Drain, DrainMiddleware

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 2
BROADCAST_TIMEOUT_S = 10.0  # /health and /metrics never hang on a stuck replica
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


def build_ingress(handle: Any, model_name: str, settings: ServerSettings, tokenizer=None,
                  block_size: int = 16) -> tuple[Starlette, Drain]:
    """handle: the replicas' DeploymentHandle; tokenizer None: no prefix hashes (the router goes by load)."""
    streaming = handle.options(stream=True)

    async def forward(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        hashes = request_prefix_hashes(path, body, tokenizer, block_size) if tokenizer is not None else ()
        stream = streaming.handle.remote(ForwardedRequest(request.method, path, request.scope["query_string"],
                                                          list(request.scope["headers"]), body, hashes))
        try:
            start: ResponseStart = await until_disconnect(request, anext(stream))
        except ClientDisconnected:
            stream.cancel()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as error:
            stream.cancel()
            return error_response(request, replica_error(error))
        response = ClosingStreamingResponse(_rest(stream, path, _content_type(start)), status_code=start.status)
        response.raw_headers = start.headers
        return response

    async def health(request: Request) -> Response:
        replicas = [r for r in await _broadcast(handle, "describe") if not isinstance(r, Exception)]
        status = 200 if replicas else 503
        return JSONResponse({"status": "ok" if replicas else "no replica is running", "model": model_name,
                             "replicas": replicas}, status_code=status)

    async def metrics(request: Request) -> Response:
        expositions = [r for r in await _broadcast(handle, "metrics") if not isinstance(r, Exception)]
        content, content_type = aggregate(expositions)
        return Response(content, media_type=content_type)

    async def root(request: Request) -> Response:
        return PlainTextResponse("ownllm is running")

    drain = Drain()
    app = Starlette(routes=[Route("/health", health), Route("/metrics", metrics),
                            Route("/", root, methods=["GET", "HEAD"]),
                            Route("/{path:path}", forward, methods=_METHODS)])
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(DrainMiddleware, drain=drain, error_response=error_response)
    return app, drain


def replica_error(error: Exception) -> ServerError:
    logger.warning("a replica failed a request: %s", error)
    return ServerError(503, f"the replica serving this request failed ({type(error).__name__}); retry",
                       code="replica_failed", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _broadcast(handle: Any, method: str) -> list:
    """Every replica's answer (or exception); none when they take longer than BROADCAST_TIMEOUT_S."""
    try:
        return await asyncio.wait_for(handle.broadcast(method).results_async(return_exceptions=True),
                                      BROADCAST_TIMEOUT_S)
    except TimeoutError:
        logger.warning("replicas did not answer %s within %ss", method, BROADCAST_TIMEOUT_S)
        return []


def _content_type(start: ResponseStart) -> str:
    return next((v.decode() for k, v in start.headers if k.lower() == b"content-type"), "")


async def _rest(stream: Any, path: str, content_type: str) -> AsyncIterator[bytes]:
    """The body after the response start; a failure mid-stream ends it with the API's error event."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except Exception as error:
        event = stream_error_event(path, content_type, replica_error(error))
        if not event:
            raise  # a plain body cut short: the connection closes mid-body and the client sees an error
        finished = True
        yield event
    finally:
        if not finished:
            stream.cancel()


def stream_error_event(path: str, content_type: str, error: ServerError) -> bytes:
    """The error as the called API sends one mid-stream; b"" where the body is not a stream of events."""
    if content_type.startswith("text/event-stream"):
        if path.startswith("/v1/messages"):
            return f"event: error\ndata: {json.dumps(anthropic.error_body(error))}\n\n".encode()
        if path.startswith("/v1/responses"):
            event = ErrorEvent(sequence_number=0, code=error.code, message=error.message, param=error.param)
            return f"event: error\ndata: {event.model_dump_json()}\n\n".encode()
        return f"data: {json.dumps(openai.error_body(error))}\n\n".encode()
    if path.startswith("/api/") and "ndjson" in content_type:
        return (json.dumps(ollama.error_body(error)) + "\n").encode()
    return b""
