"""What the OpenAI and Ollama serving modules share: the server context and settings, body parsing,
sampling params within the limits, the context-length check, and running engine requests with their
timings observed.

`run()` is the only place the server drives the engine: it maps engine refusals to HTTP errors,
records time to first token and inter-token latency, stops a request at the server's request timeout,
and aborts the engine request whenever the caller stops early (client disconnect, error, cancellation,
timeout). It never renders a response: the API modules shape what the client sees.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ownllm.multimodal import MAX_IMAGE_BYTES
from ownllm.compute.params import DEFAULT_MAX_SAMPLES
from ownllm.engine.async_engine import EngineDead, EngineOverloaded, RequestFailed
from ownllm.outputs import RequestOutput
from ownllm.parsers.reasoning import ReasoningParser
from ownllm.sampling_params import SamplingParams
from ownllm.server.errors import ServerError
from ownllm.server.limits import RequestLimits, check_params
from ownllm.server.metrics import ServerMetrics
from ownllm.server.shutdown import Drain
from ownllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
REQUEST_FIELDS = ("structured_outputs", "response_format", "format", "tools", "thinking_budget")  # named in refusals
ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


class EngineClient(Protocol):
    """The engine as the server sees it (ownllm.engine.async_engine.AsyncEngine)."""

    model_name: str
    max_model_len: int
    generation_config: dict
    tokenizer: Tokenizer
    reasoning_parser: ReasoningParser | None
    tool_parser_name: str | None

    def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str | None = None,
                 prompt: str | None = None, priority: int = 0, images: list = ()) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def start_samples(self, request_id: str, count: int) -> None: ...

    async def stop_samples(self, request_id: str, indices: list[int]) -> None: ...

    def stats(self) -> dict: ...

    def default_sampling_params(self) -> SamplingParams: ...


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    model_path: Path | None = None  # for Ollama's model listings (size, format, modification time)
    limits: RequestLimits = RequestLimits()
    request_timeout: float | None = None  # seconds from arrival after which a request is stopped (None: never)
    reasoning_budget: int | None = None  # thinking tokens of a reasoning model's answer (None: no limit)
    responses_store_size: int = 1000  # responses kept for the Responses API's GET and previous_response_id
    max_compute_samples: int = DEFAULT_MAX_SAMPLES  # the most samples one request's `compute` may ask for
    allowed_media_domains: tuple[str, ...] = ()  # hosts image URLs may be fetched from (data: URLs always work)
    max_image_bytes: int = MAX_IMAGE_BYTES  # the largest encoded image a request may send or have fetched


@dataclass
class ServerContext:
    engine: EngineClient
    settings: ServerSettings
    metrics: ServerMetrics
    started_at: float = field(default_factory=time.time)
    drain: Drain = field(default_factory=Drain)
    verifier: EngineClient | None = None  # --verifier-model: what scores `compute` samples (None: the engine)

    @property
    def model_name(self) -> str:
        return self.engine.model_name


def as_server_error(error: Exception) -> ServerError:
    """An error met after a response started, as a ServerError to send in the stream (unexpected ones logged)."""
    if isinstance(error, ServerError):
        return error
    logger.error("error while streaming a response", exc_info=error)
    return ServerError(500, f"internal server error ({type(error).__name__})")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def parse_body(body: bytes, model: type[ModelT]) -> ModelT:
    """JSON bytes -> a validated request; malformed JSON and invalid fields raise a 400 naming the field."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise ServerError(400, f"the request body is not valid JSON: {first['ctx']['error']}") from None
        param = ".".join(str(part) for part in first["loc"]) or None
        messages = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()]
        raise ServerError(400, "; ".join(messages), param=param) from None


def parse_part(model: type[ModelT], values: dict, param: str) -> ModelT:
    """One part of a request read on its own (a content block, an input item) -> a 400 naming `param.field`."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join([param, *(str(p) for p in first["loc"])])
        raise ServerError(400, f"{where}: {first['msg']}", param=where) from None


def make_params(values: dict, limits: RequestLimits, renames: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams from request values, within the server's limits (a request that names no max_tokens gets
    the server's cap, if it has one); invalid values and values over a limit become a 400 naming the API's field."""
    if values.get("max_tokens") is None and limits.max_tokens is not None:
        values = {**values, "max_tokens": limits.max_tokens}
    try:
        params = SamplingParams(**values)
    except ValueError as error:
        message = str(error)
        name = message.split(" ", 1)[0]
        param = (renames or {}).get(name, name)
        raise ServerError(400, message.replace(name, param, 1), param=param) from None
    check_params(limits, params, renames or {})
    return params


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str,
                  tokens_param: str) -> None:
    """Refuses a request that cannot fit the context: never truncated silently."""
    if num_prompt_tokens >= max_model_len:
        raise ServerError(
            400, f"the prompt is {num_prompt_tokens} tokens but this model's context is {max_model_len} tokens "
            "(room is needed for at least one new token)", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ServerError(
            400, f"this model's context is {max_model_len} tokens, but the prompt ({num_prompt_tokens} tokens) "
            f"plus {tokens_param} ({max_tokens}) is {num_prompt_tokens + max_tokens} tokens; lower {tokens_param} "
            "or shorten the prompt", param=tokens_param, code="context_length_exceeded")


@dataclass
class Timing:
    """When one request arrived, got its first and its latest token (perf_counter seconds); and, once the engine
    answers, how many prompt tokens it computed the request over (its images' placeholder tokens included), which
    is what usage reports."""

    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    num_prompt_tokens: int | None = None


async def run(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, request_id: str,
              timing: Timing, images: list = ()) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, with timings recorded; engine refusals become ServerErrors, and so
    does running past the request timeout. The request is aborted whenever the caller stops early (the engine
    cannot see a cancellation that lands while it is still adding the request, so this abort is what frees it
    then), which frees its KV blocks at once."""
    finished = False
    timeout = ctx.settings.request_timeout
    timing.num_prompt_tokens = len(prompt_ids)  # until the engine says what it made of the images
    try:
        async with aclosing(ctx.engine.generate(prompt_ids, params, request_id=request_id, images=images)) as outputs:
            while not finished:
                try:
                    output = await _next_before(outputs, None if timeout is None else timing.arrived + timeout)
                except StopAsyncIteration:
                    break
                now = time.perf_counter()
                timing.num_prompt_tokens = len(output.prompt_token_ids)
                if any(o.token_ids for o in output.outputs):
                    _observe_token(ctx.metrics, timing, now)
                finished = output.finished
                if finished:
                    ctx.metrics.observe_finished(output, now - timing.arrived)
                yield output
    except TimeoutError:
        raise ServerError(408, f"the request ran longer than this server allows ({timeout:g} s, ownllm serve "
                          "--request-timeout) and was stopped", code="request_timeout") from None
    except EngineOverloaded as error:
        raise ServerError(503, f"the server is busy ({error}); retry later", code="overloaded",
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except EngineDead as error:
        raise ServerError(500, str(error), code="engine_error") from None
    except RequestFailed as error:
        raise ServerError(500, f"internal server error: the engine failed on this request ({error}); other requests "
                          "are unaffected", code="internal_error") from None
    except ValueError as error:  # a refusal at admission: a grammar that cannot compile, a bad budget...
        field = str(error).split(" ", 1)[0]
        raise ServerError(400, str(error), param=field if field in REQUEST_FIELDS else None) from None
    finally:
        if not finished:
            await ctx.engine.abort(request_id)


async def _next_before(outputs: AsyncIterator[T], deadline: float | None) -> T:
    """The next item, or TimeoutError at `deadline` (perf_counter seconds; None: no deadline)."""
    if deadline is None:
        return await anext(outputs)
    return await asyncio.wait_for(anext(outputs), max(deadline - time.perf_counter(), 0))


def _observe_token(metrics: ServerMetrics, timing: Timing, now: float) -> None:
    if timing.first_token is None:
        timing.first_token = now
        metrics.time_to_first_token.observe(now - timing.arrived)
    else:
        metrics.inter_token_latency.observe(now - timing.last_token)
    timing.last_token = now


async def last_output(outputs: AsyncIterator[T]) -> T:
    last = None
    async for last in outputs:
        pass
    return last


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleaves several async iterators as their items arrive -> (which stream, item). The first error
    stops everything; leaving early cancels the rest."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits `awaitable` unless the client disconnects first: then it is cancelled and ClientDisconnected raised."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator when the response ends, however it ends, so a client that leaves mid-stream
    gets its engine request aborted at once rather than when the iterator is garbage collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse_response(chunks: AsyncIterator[str]) -> ClosingStreamingResponse:
    """A text/event-stream response over already framed chunks, closed with its body (see above)."""
    return ClosingStreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def first_and_rest(request: Request, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Waits for the stream's first item before a response starts (so refusals are still HTTP errors),
    then -> an iterator over all items. A client leaving during that wait closes the stream."""
    try:
        first = await until_disconnect(request, anext(stream))
    except BaseException:
        await stream.aclose()
        raise

    async def chain() -> AsyncIterator[T]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return chain()
