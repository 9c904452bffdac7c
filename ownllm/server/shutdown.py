"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server stops taking requests, lets the running ones finish for up
to the shutdown timeout, then exits with status 0.

uvicorn alone closes its listening socket at once (new clients get "connection refused", which a load balancer
cannot tell from a crash) and re-raises the signal when it is done (the process then dies by it). Here the
server keeps listening while it drains, answering every new request 503 with Retry-After (/metrics stays open),
counts the requests in flight, and hands over to uvicorn's own shutdown once none is left or the timeout has
passed; requests still running then are cancelled, which aborts them in the engine. A second Ctrl-C quits at
once.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ownllm.server.errors import ServerError

logger = logging.getLogger(__name__)
DRAIN_RETRY_AFTER_SECONDS = 5
OPEN_WHILE_DRAINING = ("/metrics",)


@dataclass
class Drain:
    """Whether the server drains, and how many requests it still serves."""

    is_draining: bool = False
    num_in_flight: int = 0


class DrainMiddleware:
    """ASGI middleware: counts requests in flight; while draining, answers new ones 503 in their API's shape."""

    def __init__(self, app: ASGIApp, drain: Drain, error_response) -> None:
        self.app = app
        self.drain = drain
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.is_draining and scope["path"] not in OPEN_WHILE_DRAINING:
            error = ServerError(503, "the server is shutting down; retry on another instance or later",
                                code="shutting_down", headers={"Retry-After": str(DRAIN_RETRY_AFTER_SECONDS),
                                                               "Connection": "close"})
            await self.error_response(Request(scope), error)(scope, receive, send)
            return
        self.drain.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.num_in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining before it shuts down (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.is_draining:
            if sig == signal.SIGINT:  # a second Ctrl-C: quit now
                self.should_exit = self.force_exit = True
            return
        self.drain.is_draining = True
        self.drain_deadline = time.monotonic() + self.shutdown_timeout
        logger.warning("%s: taking no new requests; waiting up to %gs for %d running", signal.Signals(sig).name,
                       self.shutdown_timeout, self.drain.num_in_flight)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.drain.is_draining:
            return False
        if self.drain.num_in_flight == 0:
            return True
        if time.monotonic() >= self.drain_deadline:
            logger.warning("shutdown timeout: stopping %d running requests", self.drain.num_in_flight)
            return True
        return False


def serve(app, drain: Drain, host: str, port: int, shutdown_timeout: float) -> None:
    """Runs `app` until a signal has drained it (see GracefulServer)."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=1)
    GracefulServer(config, drain, shutdown_timeout).run()
