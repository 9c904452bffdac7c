"""One HTTP request carried from the ingress to a replica and run there through the replica's own ASGI app.

ForwardedRequest is what the ingress sends (the request line, headers and body, plus the prompt's block hashes for
the router); run_app() plays the HTTP server's part inside the replica: it feeds the body to the app and yields
what the app sends, the ResponseStart first and then the body chunks, as they come (streaming answers stay
streamed). A caller that stops early (the ingress's client left, or the ingress cancelled the call) is the app's
client disconnecting: the app sees http.disconnect and aborts the engine request, as it does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)
_running: set[asyncio.Task] = set()  # apps still finishing after their caller left (kept from the collector)


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prefix_hashes: tuple[int, ...] = ()  # read by router.PrefixAwareRouter


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def run_app(app: ASGIApp, request: ForwardedRequest,
                  extra_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """-> the app's ResponseStart (with extra_headers added), then its body chunks."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    client_left = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await client_left.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "root_path": "", "query_string": request.query_string, "headers": request.headers,
             "client": None, "server": None, "state": {}}
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])) + list(extra_headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
        task.result()  # the app ended without a complete response: raise what it raised
        raise RuntimeError("the app ended without a complete response")
    finally:
        if not task.done():
            client_left.set()
            _running.add(task)
            task.add_done_callback(_running.discard)
