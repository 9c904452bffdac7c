"""The `compute` request field on /v1/chat/completions and /v1/completions: one request of N samples (one shared
prefill, decoded as one batch) read through the output layer, fed to a ComputeSession as samples finish, running
samples stopped in the engine the moment early stopping says so, the verifier (the served model, or the one given
with --verifier-model) run when asked,
and one choice returned with a `compute` object. Streaming sends progress chunks (`compute_progress`), then the
chosen answer in one chunk with the `compute` object. openai.py calls in here once it has parsed a request, and
frames the streamed chunks (SSE) itself."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ownllm.compute import ComputeParams, ComputeSession
from ownllm.compute.params import DEFAULT_TEMPERATURE
from ownllm.compute.strategies import ComputeProgress
from ownllm.compute.verifier import verifier_messages, verifier_params, verifier_text, yes_probability
from ownllm.sampling_params import SamplingParams
from ownllm.server.answers import SampleReader
from ownllm.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionRequest, CompletionChoice, CompletionRequest,
    ComputeChatChunk, ComputeChatResponse, ComputeCompletionResponse, ComputeInfo, ComputeProgressInfo,
    DeltaFunctionCall, DeltaMessage, DeltaToolCall, Usage,
)
from ownllm.server.serving import (
    ServerContext, ServerError, Timing, first_and_rest, last_output, new_id, run, until_disconnect,
)

@dataclasses.dataclass
class Verifier:
    """The model that scores samples (a context whose engine is the verifier) and how it is asked about one."""

    ctx: ServerContext
    prompt: Callable[[str], list[int]]  # a sample's answer -> the verifier's prompt ids, in its vocabulary


def verifier_context(ctx: ServerContext) -> ServerContext:
    return dataclasses.replace(ctx, engine=ctx.verifier) if ctx.verifier is not None else ctx


@dataclasses.dataclass
class ComputeRun:
    """One compute request in flight: its session, a reader per sample, and the token counts for usage."""

    session: ComputeSession
    readers: list[SampleReader]
    num_prompt_tokens: int
    num_verifier_prompt_tokens: int = 0
    num_verifier_tokens: int = 0

    def usage(self) -> Usage:
        prompt = self.num_prompt_tokens + self.num_verifier_prompt_tokens
        completion = sum(len(r.token_ids) for r in self.readers) + self.num_verifier_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def info(self) -> ComputeInfo:
        return ComputeInfo.model_validate(self.session.result().as_dict())

    def chosen(self) -> SampleReader:
        return self.readers[self.session.result().chosen_index]


def compute_params(ctx: ServerContext, body: ChatCompletionRequest | CompletionRequest,
                   logprobs_asked: bool) -> ComputeParams:
    """The request's compute field, checked against the request and the server's limit (400 naming the field)."""
    if body.n != 1:
        raise ServerError(400, "compute cannot be combined with n > 1: compute.samples sets the number of samples",
                          param="n")
    if logprobs_asked:
        raise ServerError(400, "compute cannot be combined with logprobs", param="logprobs")
    try:
        params = ComputeParams(**body.compute.model_dump())
        params.check_limit(ctx.settings.max_compute_samples)
    except ValueError as error:
        raise ServerError(400, str(error), param=str(error).split(" ", 1)[0]) from None
    return params


def sample_params(body: ChatCompletionRequest | CompletionRequest, params: SamplingParams,
                  session: ComputeSession) -> SamplingParams:
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else params.temperature
    return dataclasses.replace(params, n=session.params.samples, n_started=session.num_started,
                               temperature=temperature, output_kind="delta")


async def drive(ctx: ServerContext, state: ComputeRun, prompt_ids: list[int], params: SamplingParams,
                request_id: str, verifier: Verifier) -> AsyncIterator[ComputeProgress]:
    """Runs the samples -> progress when the first output arrives and whenever a sample finishes; stops the running
    samples once the vote is decided; then scores samples with the verifier if asked."""
    session, readers = state.session, state.readers
    started = False
    async for output in run(ctx, prompt_ids, params, request_id, Timing()):
        num_finished = len(session.complete)
        for delta in output.outputs:
            reader = readers[delta.index]
            reader.read(delta)
            logprob = delta.cumulative_logprob or 0.0
            if not delta.finished:
                session.update(delta.index, len(reader.token_ids), logprob)
                continue
            session.finish(delta.index, reader.message().content, len(reader.token_ids), logprob, delta.finish_reason)
        to_stop = session.samples_to_stop()
        if to_stop:
            await ctx.engine.stop_samples(request_id, to_stop)
        elif more := session.samples_to_start():
            await ctx.engine.start_samples(request_id, more)
        if not started or len(session.complete) > num_finished:
            started = True
            yield session.progress()
    if session.params.scorer == "verifier":
        await _verify(verifier, state, request_id)


async def _verify(verifier: Verifier, state: ComputeRun, request_id: str) -> None:
    samples = state.session.complete
    prompts = [verifier.prompt(sample.text) for sample in samples]
    outputs = await asyncio.gather(*(  # together: one engine batch
        last_output(run(verifier.ctx, ids, verifier_params(), f"{request_id}-verify-{s.index}", Timing()))
        for s, ids in zip(samples, prompts)))
    for sample, output in zip(samples, outputs):
        entries = output.outputs[0].logprobs or [{}]
        sample.score = yes_probability((lp.decoded_token or "", lp.logprob) for lp in entries[0].values())
        state.num_verifier_tokens += len(output.outputs[0].token_ids)
    state.num_verifier_prompt_tokens = sum(len(ids) for ids in prompts)


def _progress_info(progress: ComputeProgress) -> ComputeProgressInfo:
    return ComputeProgressInfo.model_validate(dataclasses.asdict(progress))


# ---- /v1/chat/completions


async def serve_chat(ctx: ServerContext, request: Request, body: ChatCompletionRequest, prompt_ids: list[int],
                     params: SamplingParams, new_reader: Callable[[], SampleReader],
                     messages: list[dict]) -> Response | AsyncIterator[str]:
    compute = compute_params(ctx, body, body.logprobs)
    state = ComputeRun(ComputeSession(compute), [new_reader() for _ in range(compute.samples)], len(prompt_ids))

    verifier_ctx = verifier_context(ctx)
    verifier = Verifier(verifier_ctx,
                        lambda answer: verifier_ctx.engine.tokenizer.encode_chat(verifier_messages(messages, answer)))
    request_id = new_id("chatcmpl")
    progress = drive(ctx, state, prompt_ids, sample_params(body, params, state.session), request_id, verifier)
    if body.stream:
        progress = await first_and_rest(request, progress)
        return _chat_chunks(ctx, body, request_id, state, progress)
    await until_disconnect(request, _drain(progress))
    reader = state.chosen()
    choice = ChatChoice(index=0, message=AssistantMessage.of(reader.message()), finish_reason=reader.finish_reason,
                        stop_reason=reader.stop_reason)
    return JSONResponse(ComputeChatResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name, choices=[choice], usage=state.usage(),
        compute=state.info()).model_dump())


async def _drain(progress: AsyncIterator[ComputeProgress]) -> None:
    async for _ in progress:
        pass


async def _chat_chunks(ctx: ServerContext, body: ChatCompletionRequest, request_id: str, state: ComputeRun,
                       progress: AsyncIterator[ComputeProgress]) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], **fields) -> str:
        return ComputeChatChunk(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                **fields).model_dump_json()

    yield chunk([ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
    async for step in progress:
        yield chunk([], compute_progress=_progress_info(step))
    reader = state.chosen()
    message = AssistantMessage.of(reader.message())
    calls = [DeltaToolCall(index=i, id=call.id, type="function",
                           function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
             for i, call in enumerate(message.tool_calls)] or None
    delta = DeltaMessage(content=message.content, reasoning_content=message.reasoning_content, tool_calls=calls)
    yield chunk([ChatChunkChoice(index=0, delta=delta, finish_reason=reader.finish_reason,
                                 stop_reason=reader.stop_reason)], compute=state.info())
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=state.usage())


# ---- /v1/completions


async def serve_completion(ctx: ServerContext, request: Request, body: CompletionRequest,
                           prompts: list[tuple[str, list[int]]], params: SamplingParams,
                           new_reader: Callable[[], SampleReader]) -> Response | AsyncIterator[str]:
    compute = compute_params(ctx, body, body.logprobs is not None)
    if len(prompts) != 1:
        raise ServerError(400, f"compute takes one prompt, got {len(prompts)}", param="prompt")
    [(prompt, prompt_ids)] = prompts
    state = ComputeRun(ComputeSession(compute), [new_reader() for _ in range(compute.samples)], len(prompt_ids))

    verifier_ctx = verifier_context(ctx)
    verifier = Verifier(verifier_ctx, lambda answer: verifier_ctx.engine.tokenizer.encode(verifier_text(prompt, answer)))
    request_id = new_id("cmpl")
    progress = drive(ctx, state, prompt_ids, sample_params(body, params, state.session), request_id, verifier)
    if body.stream:
        progress = await first_and_rest(request, progress)
        return _completion_chunks(ctx, body, request_id, prompt, state, progress)
    await until_disconnect(request, _drain(progress))
    return JSONResponse(ComputeCompletionResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name,
        choices=[_completion_choice(body, prompt, state)], usage=state.usage(), compute=state.info()).model_dump())


def _completion_choice(body: CompletionRequest, prompt: str, state: ComputeRun) -> CompletionChoice:
    reader = state.chosen()
    text = (prompt if body.echo else "") + reader.message().content
    return CompletionChoice(index=0, text=text, finish_reason=reader.finish_reason, stop_reason=reader.stop_reason)


async def _completion_chunks(ctx: ServerContext, body: CompletionRequest, request_id: str, prompt: str,
                             state: ComputeRun, progress: AsyncIterator[ComputeProgress]) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], **fields) -> str:
        return ComputeCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                         **fields).model_dump_json()

    async for step in progress:
        yield chunk([], compute_progress=_progress_info(step))
    yield chunk([_completion_choice(body, prompt, state)], compute=state.info())
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=state.usage())
