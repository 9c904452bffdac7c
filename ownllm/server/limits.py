"""What one request may ask of the server: body size, messages, max tokens, samples, stop sequences, logprobs.

Each limit is a `ownllm serve` option with a default that keeps one request from taking the machine, and a
request over it gets a 400 (413 for the body) naming the field, its value, the limit and the option that sets
it. The body limit is an ASGI middleware, so an oversized body is refused while it arrives, before it is
buffered whole. This module only checks: it never changes a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ownllm.sampling_params import SamplingParams
from ownllm.server.errors import ServerError


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 16 * 2**20  # room for a long context's prompt as text or token ids
    max_messages: int = 1024
    max_tokens: int | None = None  # None: the model's context is the limit
    max_n: int = 16
    max_stop: int = 32  # stop strings, and stop token ids, each
    max_logprobs: int = 20  # OpenAI's and vLLM's


def _over(subject: str, param: str, limit: int, what: str, option: str) -> ServerError:
    return ServerError(400, f"{subject} but this server allows at most {limit} {what} (ownllm serve {option})",
                       param=param, code="limit_exceeded")


def check_messages(limits: RequestLimits, num_messages: int, param: str = "messages") -> None:
    if num_messages > limits.max_messages:
        raise _over(f"{param} has {num_messages} entries", param, limits.max_messages, "messages", "--max-messages")


def check_params(limits: RequestLimits, params: SamplingParams, param_names: dict[str, str]) -> None:
    """Refuses sampling params over the limits; param_names maps SamplingParams' names to the API's."""

    def name(field: str) -> str:
        return param_names.get(field, field)

    if params.n > limits.max_n:
        raise _over(f"n is {params.n}", name("n"), limits.max_n, "samples per request", "--max-n")
    if limits.max_tokens is not None and params.max_tokens is not None and params.max_tokens > limits.max_tokens:
        raise _over(f"{name('max_tokens')} is {params.max_tokens}", name("max_tokens"), limits.max_tokens,
                    "tokens per answer", "--max-completion-tokens")
    for field in ("stop", "stop_token_ids"):
        count = len(getattr(params, field))
        if count > limits.max_stop:
            raise _over(f"{name(field)} has {count} entries", name(field), limits.max_stop, "stop sequences",
                        "--max-stop")
    if params.logprobs is not None and params.logprobs > limits.max_logprobs:
        raise _over(f"{name('logprobs')} is {params.logprobs}", name("logprobs"), limits.max_logprobs,
                    "logprobs per token", "--max-logprobs")


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes (declared or as it streams in) ends in a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(int(declared))
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > self.max_bytes:
                raise self._too_large(num_received)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, num_bytes: int) -> ServerError:
        return ServerError(413, f"the request body is {'at least ' * (num_bytes <= self.max_bytes)}{num_bytes} bytes "
                           f"but this server accepts at most {self.max_bytes} (ownllm serve --max-body-size)",
                           code="limit_exceeded")
