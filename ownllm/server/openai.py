"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions and /v1/models, and how each request
becomes engine requests and engine outputs become OpenAI responses (JSON or SSE chunks).

Answers are read once, through server/answers.py (tool calls, reasoning text, structured outputs), from the
engine's per-step deltas; this module only renders the events. Options OpenAI clients may send but ownllm
cannot honour yet (logit_bias, suffix) are refused with a 400 naming them, never silently ignored. A completion
with echo and logprobs also scores the prompt (the engine's prompt logprobs), as evaluation harnesses ask. A
request with `compute` (several samples, one chosen answer) is served by server/compute.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ownllm.multimodal.chat import split_images
from ownllm.outputs import Logprob, RequestOutput
from ownllm.parsers.events import ContentDelta, Event, OutputStream, ReasoningDelta, ToolCallStart
from ownllm.sampling_params import SamplingParams, StructuredOutputsParams
from ownllm.server import compute
from ownllm.server.answers import (
    SampleReader, openai_structured_outputs, read_all, reader_factory, template_messages, thinking_budget, tool_plan,
)
from ownllm.server.images import load_images
from ownllm.server.limits import check_messages
from ownllm.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    CompletionTokensDetails, DeltaFunctionCall, DeltaMessage, DeltaToolCall, ErrorInfo, ErrorResponse,
    ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
)
from ownllm.server.serving import (
    ServerContext, ServerError, Timing, as_server_error, check_context, first_and_rest,
    make_params, merge, new_id, parse_body, run, sse_response, until_disconnect,
)

MIN_LOGPROB = -9999.0  # JSON has no -inf


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def list_models() -> Response:
        return _json(ModelList(data=[_model_card(ctx)]))

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        check_model(ctx, model_id)
        return _json(_model_card(ctx))

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve_chat(ctx, request)

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        return await serve_completion(ctx, request)

    return api


def error_body(error: ServerError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    info = ErrorInfo(message=error.message, type=kind, param=error.param, code=error.code)
    return ErrorResponse(error=info).model_dump()


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise ServerError(404, f"The model `{model}` does not exist; this server serves `{ctx.model_name}`.",
                          param="model", code="model_not_found")


def _model_card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, created=int(ctx.started_at), max_model_len=ctx.engine.max_model_len)


def _json(model) -> Response:
    return JSONResponse(model.model_dump())


# ---- requests -> engine inputs


def _check_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.logit_bias:
        raise ServerError(400, "logit_bias is not supported", param="logit_bias")


def _check_chat(body: ChatCompletionRequest) -> None:
    _check_common(body)
    if body.top_logprobs and not body.logprobs:
        raise ServerError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def _chat_messages(body: ChatCompletionRequest) -> tuple[list[dict], list[tuple[str, Any]]]:
    """-> (messages for the template, [(field path, image URL)] in order)."""
    try:
        messages, images = split_images([message.model_dump() for message in body.messages])
    except ValueError as error:
        param = str(error).split(":", 1)[0]
        raise ServerError(400, str(error), param=param) from None
    return template_messages(messages), images


def _chat_prompt_ids(ctx: ServerContext, body: ChatCompletionRequest, messages: list[dict]) -> list[int]:
    try:
        return ctx.engine.tokenizer.encode_chat(
            messages, tools=body.tools, add_generation_prompt=body.add_generation_prompt,
            **(body.chat_template_kwargs or {}))
    except (ValueError, TypeError) as error:
        raise ServerError(400, str(error), param="messages") from None


def _completion_prompts(ctx: ServerContext, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt token ids) for each prompt the request holds."""
    prompt = body.prompt
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items:
        raise ServerError(400, "prompt is empty", param="prompt")
    tokenizer = ctx.engine.tokenizer
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append((item, tokenizer.encode(item)))
            continue
        if not all(0 <= t < tokenizer.vocab_size for t in item):
            raise ServerError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        prompts.append((tokenizer.decode(item), list(item)))
    if any(not ids for _, ids in prompts):
        raise ServerError(400, "prompt is empty", param="prompt")
    return prompts


def _check_completion(body: CompletionRequest) -> None:
    _check_common(body)
    if body.suffix:
        raise ServerError(400, "suffix (fill in the middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ServerError(400, "best_of is not supported (it may only equal n)", param="best_of")


def _sampling_params(ctx: ServerContext, body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                     logprobs: int | None, structured: StructuredOutputsParams | None = None,
                     budget: int | None = None, keep_special_tokens: bool = False,
                     renames: dict[str, str] | None = None) -> SamplingParams:
    defaults = ctx.engine.default_sampling_params()

    def pick(name: str):
        value = getattr(body, name)
        return getattr(defaults, name) if value is None else value

    return make_params(dict(
        n=body.n, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"), min_p=pick("min_p"),
        repetition_penalty=pick("repetition_penalty"), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, max_tokens=max_tokens, min_tokens=body.min_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []), stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens and not keep_special_tokens, structured_outputs=structured,
        thinking_budget=budget, output_kind="delta",
    ), ctx.settings.limits, renames)


# ---- logprobs


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)[:k]


def _token_text(logprob: Logprob) -> str:
    return logprob.decoded_token or ""


def _chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        content.append(TokenLogprob(
            token=_token_text(chosen), logprob=max(chosen.logprob, MIN_LOGPROB),
            bytes=list(_token_text(chosen).encode()),
            top_logprobs=[TopLogprob(token=_token_text(lp), logprob=max(lp.logprob, MIN_LOGPROB),
                                     bytes=list(_token_text(lp).encode())) for lp in _top(entry, k)],
        ))
    return ChatLogprobs(content=content)


def _completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int,
                         offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        result.tokens.append(_token_text(chosen))
        result.token_logprobs.append(max(chosen.logprob, MIN_LOGPROB))
        top = {_token_text(lp): max(lp.logprob, MIN_LOGPROB) for lp in [*_top(entry, k), chosen]}
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(_token_text(chosen))
    return result


def _echo_logprobs(ctx: ServerContext, prompt_ids: list[int], entries: list[dict[int, Logprob] | None] | None,
                   k: int) -> CompletionLogprobs | None:
    """The echoed prompt's logprobs (from the engine's prompt logprobs; None if the request ended before they
    came); its first token, which nothing predicts, has null ones, as in OpenAI's legacy API."""
    if entries is None:
        return None
    first_text = ctx.engine.tokenizer.decode(prompt_ids[:1], skip_special_tokens=False)
    rest = _completion_logprobs(prompt_ids[1:], entries[1:], k, len(first_text))
    return CompletionLogprobs(tokens=[first_text, *rest.tokens], token_logprobs=[None, *rest.token_logprobs],
                              top_logprobs=[None, *rest.top_logprobs], text_offset=[0, *rest.text_offset])


def _joined(echoed: CompletionLogprobs | None, generated: CompletionLogprobs) -> CompletionLogprobs:
    if echoed is None:
        return generated
    return CompletionLogprobs(tokens=echoed.tokens + generated.tokens,
                              token_logprobs=echoed.token_logprobs + generated.token_logprobs,
                              top_logprobs=echoed.top_logprobs + generated.top_logprobs,
                              text_offset=echoed.text_offset + generated.text_offset)


def _usage(ctx: ServerContext, num_prompt_tokens: int, readers: list[SampleReader]) -> Usage:
    num_completion = sum(len(r.token_ids) for r in readers)
    details = None
    if ctx.engine.reasoning_parser is not None:
        details = CompletionTokensDetails(reasoning_tokens=sum(r.reasoning_tokens() for r in readers))
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion,
                 total_tokens=num_prompt_tokens + num_completion, completion_tokens_details=details)


async def _sse_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data: ...` events ending with `data: [DONE]`; an error mid-stream is sent as an error event."""
    try:
        async for event in events:
            yield f"data: {event}\n\n"
    except Exception as error:
        yield f"data: {json.dumps(error_body(as_server_error(error)))}\n\n"
    yield "data: [DONE]\n\n"


async def _read_prompts(merged: AsyncIterator[tuple[int, RequestOutput]], readers: list[list[SampleReader]],
                        prompt_logprobs: list) -> None:
    """Feeds every delta of every prompt's samples to its reader, and keeps each prompt's logprobs."""
    async for p, output in merged:
        if output.prompt_logprobs is not None:
            prompt_logprobs[p] = output.prompt_logprobs
        for delta in output.outputs:
            readers[p][delta.index].read(delta)


# ---- /v1/chat/completions


async def serve_chat(ctx: ServerContext, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), ChatCompletionRequest)
    check_model(ctx, body.model)
    check_messages(ctx.settings.limits, len(body.messages))
    _check_chat(body)
    tools = tool_plan(ctx, body.tools, body.tool_choice, body.parallel_tool_calls)
    structured = openai_structured_outputs(body.response_format, body.structured_outputs)
    if structured is not None and tools.structured_outputs is not None:
        raise ServerError(400, "a structured output (response_format or structured_outputs) cannot be combined with "
                          f"{tools.grammar_reason}", param="tool_choice")
    messages, image_sources = _chat_messages(body)
    images = await load_images(ctx, image_sources)
    prompt_ids = _chat_prompt_ids(ctx, body, messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_context(len(prompt_ids), max_tokens, ctx.engine.max_model_len, "messages", tokens_param)
    params = _sampling_params(
        ctx, body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
        structured or tools.structured_outputs, thinking_budget(ctx, body.thinking_budget, body.reasoning_effort),
        tools.keep_special_tokens, {"max_tokens": tokens_param, "logprobs": "top_logprobs"})
    if body.compute is not None:
        answer = await compute.serve_chat(ctx, request, body, prompt_ids, params,
                                          reader_factory(ctx, prompt_ids, tools), messages)
        return sse_response(_sse_events(answer)) if body.stream else answer
    request_id = new_id("chatcmpl")
    outputs = run(ctx, prompt_ids, params, request_id, timing, images)
    readers = [reader_factory(ctx, prompt_ids, tools)() for _ in range(body.n)]
    if body.stream:
        outputs = await first_and_rest(request, outputs)
        return sse_response(_sse_events(_chat_chunks(ctx, body, request_id, timing, outputs, readers)))
    await until_disconnect(request, read_all(outputs, readers))
    choices = [_chat_choice(i, reader, body) for i, reader in enumerate(readers)]
    return _json(ChatCompletionResponse(id=request_id, created=int(time.time()), model=ctx.model_name,
                                        choices=choices, usage=_usage(ctx, timing.num_prompt_tokens, readers)))


def _chat_choice(index: int, reader: SampleReader, body: ChatCompletionRequest) -> ChatChoice:
    logprobs = _chat_logprobs(reader.token_ids, reader.logprobs, body.top_logprobs or 0) if body.logprobs else None
    return ChatChoice(index=index, message=AssistantMessage.of(reader.message()), finish_reason=reader.finish_reason,
                      stop_reason=reader.stop_reason, logprobs=logprobs)


def _delta(event: Event) -> DeltaMessage:
    if isinstance(event, ContentDelta):
        return DeltaMessage(content=event.text)
    if isinstance(event, ReasoningDelta):
        return DeltaMessage(reasoning_content=event.text)
    if isinstance(event, ToolCallStart):  # OpenAI's first delta of a call: index, id, type and name
        call = DeltaToolCall(index=event.index, id=event.id, type="function",
                             function=DeltaFunctionCall(name=event.name, arguments=""))
    else:
        call = DeltaToolCall(index=event.index, function=DeltaFunctionCall(arguments=event.fragment))
    return DeltaMessage(tool_calls=[call])


async def _chat_chunks(ctx: ServerContext, body: ChatCompletionRequest, request_id: str, timing: Timing,
                       outputs: AsyncIterator[RequestOutput], readers: list[SampleReader]) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                   usage=usage).model_dump_json()

    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(body.n)])
    async for output in outputs:
        for delta in output.outputs:
            reader = readers[delta.index]
            if reader.finished:
                continue
            start = len(reader.token_ids)
            deltas = [_delta(event) for event in reader.read(delta)]
            logprobs = None
            if body.logprobs and len(reader.token_ids) > start:
                logprobs = _chat_logprobs(reader.token_ids[start:], reader.logprobs[start:], body.top_logprobs or 0)
            if not deltas and (logprobs or reader.finished):
                deltas = [DeltaMessage(content="")]
            for j, message in enumerate(deltas):
                last = j == len(deltas) - 1
                yield chunk([ChatChunkChoice(
                    index=delta.index, delta=message, logprobs=logprobs if j == 0 else None,
                    finish_reason=reader.finish_reason if last else None,
                    stop_reason=reader.stop_reason if last else None)])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(ctx, timing.num_prompt_tokens, readers))


# ---- /v1/completions


async def serve_completion(ctx: ServerContext, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), CompletionRequest)
    check_model(ctx, body.model)
    _check_completion(body)
    structured = openai_structured_outputs(body.response_format, body.structured_outputs)
    prompts = _completion_prompts(ctx, body)
    for _, ids in prompts:
        check_context(len(ids), body.max_tokens, ctx.engine.max_model_len, "prompt", "max_tokens")
    params = _sampling_params(ctx, body, body.max_tokens, body.logprobs, structured)
    if body.echo and body.logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
    if body.compute is not None:
        answer = await compute.serve_completion(ctx, request, body, prompts, params,
                                                lambda: SampleReader(OutputStream()))
        return sse_response(_sse_events(answer)) if body.stream else answer
    request_id = new_id("cmpl")
    streams = [run(ctx, ids, params, f"{request_id}-{i}", Timing(timing.arrived)) for i, (_, ids) in enumerate(prompts)]
    num_prompt_tokens = sum(len(ids) for _, ids in prompts)
    readers = [[SampleReader(OutputStream()) for _ in range(body.n)] for _ in prompts]
    prompt_logprobs = [None] * len(prompts)  # each prompt's, with echo and logprobs
    merged = merge(streams)
    if body.stream:
        merged = await first_and_rest(request, merged)
        return sse_response(_sse_events(_completion_chunks(ctx, body, request_id, prompts, num_prompt_tokens, merged,
                                                   readers, prompt_logprobs)))
    await until_disconnect(request, _read_prompts(merged, readers, prompt_logprobs))
    choices = []
    for p, prompt_readers in enumerate(readers):
        for i, reader in enumerate(prompt_readers):
            text = (prompts[p][0] if body.echo else "") + reader.message().content
            logprobs = None
            if body.logprobs is not None:
                echoed = _echo_logprobs(ctx, prompts[p][1], prompt_logprobs[p], body.logprobs) if body.echo else None
                offset = sum(map(len, echoed.tokens)) if echoed else 0
                logprobs = _joined(echoed, _completion_logprobs(reader.token_ids, reader.logprobs, body.logprobs,
                                                                offset))
            choices.append(CompletionChoice(index=p * body.n + i, text=text, logprobs=logprobs,
                                            finish_reason=reader.finish_reason, stop_reason=reader.stop_reason))
    return _json(CompletionResponse(id=request_id, created=int(time.time()), model=ctx.model_name, choices=choices,
                                    usage=_usage(ctx, num_prompt_tokens, [r for rs in readers for r in rs])))


async def _completion_chunks(ctx: ServerContext, body: CompletionRequest, request_id: str,
                             prompts: list[tuple[str, list[int]]], num_prompt_tokens: int,
                             merged: AsyncIterator[tuple[int, RequestOutput]], readers: list[list[SampleReader]],
                             prompt_logprobs: list) -> AsyncIterator[str]:
    created = int(time.time())
    num_choices = len(prompts) * body.n
    echoes = [prompts[i // body.n][0] if body.echo else "" for i in range(num_choices)]
    offsets = [0] * num_choices
    async for p, output in merged:
        choices = []
        if output.prompt_logprobs is not None:
            prompt_logprobs[p] = output.prompt_logprobs
        for delta in output.outputs:
            i, reader = p * body.n + delta.index, readers[p][delta.index]
            if reader.finished:
                continue
            start = len(reader.token_ids)
            text = echoes[i] + "".join(e.text for e in reader.read(delta))
            if not text and len(reader.token_ids) == start and not reader.finished:
                continue
            logprobs = None
            if body.logprobs is not None:
                echoed = None
                if echoes[i]:  # the choice's first chunk echoes the prompt
                    echoed = _echo_logprobs(ctx, prompts[p][1], prompt_logprobs[p], body.logprobs)
                    offsets[i] = sum(map(len, echoed.tokens))
                generated = _completion_logprobs(reader.token_ids[start:], reader.logprobs[start:], body.logprobs,
                                                 offsets[i])
                offsets[i] += sum(map(len, generated.tokens))
                logprobs = _joined(echoed, generated)
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reader.finish_reason,
                                            stop_reason=reader.stop_reason))
            echoes[i] = ""
        if choices:
            yield CompletionResponse(id=request_id, created=created, model=ctx.model_name,
                                     choices=choices).model_dump_json()
    if body.stream_options and body.stream_options.include_usage:
        usage = _usage(ctx, num_prompt_tokens, [r for rs in readers for r in rs])
        yield CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[],
                                 usage=usage).model_dump_json()
