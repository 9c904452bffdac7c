"""Anthropic's Messages API: POST /v1/messages (JSON or Anthropic's SSE events) and POST /v1/messages/count_tokens,
and how an Anthropic request becomes a chat prompt and sampling params.

Messages and their blocks become the chat template's messages (tool_use blocks -> the assistant's tool_calls,
tool_result blocks -> tool messages); tools and tool_choice become the OpenAI-style tool plan of answers.py
(any -> required, tool -> a named function). Answers are read through the one output layer and split into
content blocks by blocks.py; this module only renders them. Errors on these routes take Anthropic's shape
(error_body, chosen by app.py).
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ownllm.sampling_params import SamplingParams
from ownllm.server.anthropic_protocol import (
    BLOCK_TYPES, ContentBlock, ContentBlockDelta, ContentBlockStart, ContentBlockStop, CountTokensRequest,
    ErrorDetail, ErrorResponse, InputJsonDelta, MessageDelta, MessageDeltaBody, MessageDeltaUsage, MessageParam,
    MessageResponse, MessagesRequest, MessageStart, MessageStop, Ping, StopReason, StreamEvent, TextBlock,
    TextBlockParam, TextDelta, ThinkingBlock, ThinkingDelta, TokenCount, ToolChoiceParam, ToolResultBlockParam,
    ToolUseBlock, ToolUseBlockParam, Usage,
)
from ownllm.server.answers import SampleReader, ToolPlan, read_all, reader_factory, thinking_budget, tool_plan
from ownllm.server.blocks import Block, BlockChange, BlockSplitter, answer_blocks
from ownllm.server.limits import check_messages
from ownllm.server.openai import check_model
from ownllm.server.serving import (
    ServerContext, ServerError, Timing, as_server_error, check_context, first_and_rest,
    make_params, new_id, parse_body, parse_part, run, sse_response, until_disconnect,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(prefix="/v1/messages")

    @api.post("")
    async def messages(request: Request) -> Response:
        return await serve_messages(ctx, request)

    @api.post("/count_tokens")
    async def count_tokens(request: Request) -> Response:
        body = parse_body(await request.body(), CountTokensRequest)
        check_model(ctx, body.model)
        prompt_ids, _ = _prompt(ctx, body)
        return JSONResponse(TokenCount(input_tokens=len(prompt_ids)).model_dump())

    return api


def error_body(error: ServerError) -> dict:
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorDetail(type=kind, message=error.message)).model_dump()


# ---- requests -> prompt and sampling params


def _prompt(ctx: ServerContext, body: CountTokensRequest) -> tuple[list[int], ToolPlan]:
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in body.tools or []]
    plan = tool_plan(ctx, tools, _openai_tool_choice(body.tool_choice, tools),
                     not (body.tool_choice and body.tool_choice.disable_parallel_tool_use))
    system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system or [])
    messages = ([{"role": "system", "content": system}] if system else []) + _chat_messages(body.messages)
    kwargs = {}
    if body.thinking is not None and "enable_thinking" in str(ctx.engine.tokenizer.chat_template or ""):
        kwargs["enable_thinking"] = body.thinking.type != "disabled"
    try:
        return ctx.engine.tokenizer.encode_chat(messages, tools=tools or None, **kwargs), plan
    except (ValueError, TypeError) as error:
        raise ServerError(400, str(error), param="messages") from None


def _openai_tool_choice(choice: ToolChoiceParam | None, tools: list[dict]) -> str | dict | None:
    if choice is None:
        return None
    if choice.type in ("any", "tool") and not tools:
        raise ServerError(400, f'tool_choice "{choice.type}" needs tools', param="tool_choice")
    if choice.type == "tool":
        if choice.name is None:
            raise ServerError(400, 'tool_choice.name is required when tool_choice.type is "tool"',
                              param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"any": "required"}.get(choice.type, choice.type)


def _chat_messages(messages: list[MessageParam]) -> list[dict]:
    """Anthropic messages -> the template's: tool results become tool messages before the user's text."""
    result = []
    for i, message in enumerate(messages):
        content = message.content
        blocks = ([TextBlockParam(type="text", text=content)] if isinstance(content, str)
                  else [_block(block, f"messages.{i}.content.{j}") for j, block in enumerate(content)])
        calls = [b for b in blocks if isinstance(b, ToolUseBlockParam)]
        results = [b for b in blocks if isinstance(b, ToolResultBlockParam)]
        if (calls and message.role == "user") or (results and message.role == "assistant"):
            kind = "tool_use" if calls else "tool_result"
            raise ServerError(400, f"messages.{i}: {message.role} messages cannot hold {kind} blocks",
                              param=f"messages.{i}.content")
        result += [{"role": "tool", "tool_call_id": r.tool_use_id, "content": _result_text(r)} for r in results]
        texts = [b.text for b in blocks if isinstance(b, TextBlockParam)]
        if texts or calls or not results:
            entry = {"role": message.role, "content": "\n".join(texts)}
            if calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": c.input}} for c in calls]
            result.append(entry)
    return result


def _block(values: dict, param: str):
    kind = values.get("type")
    model = BLOCK_TYPES.get(kind)
    if model is None:
        raise ServerError(400, f"{param}.type: content blocks of type {kind!r} are not supported (text, tool_use, "
                          "tool_result, thinking)", param=f"{param}.type")
    return parse_part(model, values, param)


def _result_text(block: ToolResultBlockParam) -> str:
    return block.content if isinstance(block.content, str) else "\n".join(b.text for b in block.content)


def _sampling_params(ctx: ServerContext, body: MessagesRequest, plan: ToolPlan) -> SamplingParams:
    defaults = ctx.engine.default_sampling_params()

    def pick(name: str):
        value = getattr(body, name)
        return getattr(defaults, name) if value is None else value

    budget = body.thinking.budget_tokens if body.thinking and body.thinking.type == "enabled" else None
    return make_params(dict(
        temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"), min_p=defaults.min_p,
        repetition_penalty=defaults.repetition_penalty, max_tokens=body.max_tokens,
        stop=list(body.stop_sequences or []), structured_outputs=plan.structured_outputs,
        thinking_budget=thinking_budget(ctx, budget), skip_special_tokens=not plan.keep_special_tokens,
        output_kind="delta",
    ), ctx.settings.limits, {"stop": "stop_sequences", "thinking_budget": "thinking.budget_tokens"})


# ---- /v1/messages


async def serve_messages(ctx: ServerContext, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), MessagesRequest)
    check_model(ctx, body.model)
    check_messages(ctx.settings.limits, len(body.messages))
    prompt_ids, plan = _prompt(ctx, body)
    check_context(len(prompt_ids), body.max_tokens, ctx.engine.max_model_len, "messages", "max_tokens")
    message_id = new_id("msg")
    outputs = run(ctx, prompt_ids, _sampling_params(ctx, body, plan), message_id, timing)
    reader = reader_factory(ctx, prompt_ids, plan)()
    if body.stream:
        outputs = await first_and_rest(request, outputs)
        events = _stream_events(ctx, message_id, len(prompt_ids), outputs, reader)
        return sse_response(_sse(events))

    await until_disconnect(request, read_all(outputs, [reader]))
    stop_reason, stop_sequence = _stop_reason(reader)
    response = MessageResponse(
        id=message_id, model=ctx.model_name, content=[_content_block(b) for b in answer_blocks(reader.events)],
        stop_reason=stop_reason, stop_sequence=stop_sequence,
        usage=Usage(input_tokens=len(prompt_ids), output_tokens=len(reader.token_ids)))
    return JSONResponse(response.model_dump())


def _stop_reason(reader: SampleReader) -> tuple[StopReason, str | None]:
    if reader.finish_reason == "tool_calls":
        return "tool_use", None
    if reader.finish_reason == "length":
        return "max_tokens", None
    if isinstance(reader.stop_reason, str):
        return "stop_sequence", reader.stop_reason
    return "end_turn", None


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _content_block(block: Block) -> ContentBlock:
    if block.kind == "reasoning":
        return ThinkingBlock(thinking=block.text)
    if block.kind == "text":
        return TextBlock(text=block.text)
    try:
        arguments = json.loads(block.text or "{}")
    except json.JSONDecodeError:
        arguments = None
    return ToolUseBlock(id=_tool_use_id(block.call_id), name=block.name,
                        input=arguments if isinstance(arguments, dict) else {})


def _stream_event(change: BlockChange) -> StreamEvent:
    block = change.block
    if change.kind == "open":
        empty = Block(block.kind, block.index, call_id=block.call_id, name=block.name)
        return ContentBlockStart(index=block.index, content_block=_content_block(empty))
    if change.kind == "close":
        return ContentBlockStop(index=block.index)
    delta = (ThinkingDelta(thinking=change.text) if block.kind == "reasoning" else
             TextDelta(text=change.text) if block.kind == "text" else InputJsonDelta(partial_json=change.text))
    return ContentBlockDelta(index=block.index, delta=delta)


async def _stream_events(ctx: ServerContext, message_id: str, num_prompt_tokens: int, outputs,
                         reader: SampleReader) -> AsyncIterator[StreamEvent]:
    yield MessageStart(message=MessageResponse(id=message_id, model=ctx.model_name, content=[],
                                               usage=Usage(input_tokens=num_prompt_tokens, output_tokens=0)))
    yield Ping()
    splitter = BlockSplitter()
    async for output in outputs:
        for delta in output.outputs:
            for change in splitter.feed(reader.read(delta)):
                yield _stream_event(change)
    for change in splitter.close():
        yield _stream_event(change)
    stop_reason, stop_sequence = _stop_reason(reader)
    yield MessageDelta(delta=MessageDeltaBody(stop_reason=stop_reason, stop_sequence=stop_sequence),
                       usage=MessageDeltaUsage(output_tokens=len(reader.token_ids)))
    yield MessageStop()


async def _sse(events: AsyncIterator[StreamEvent]) -> AsyncIterator[str]:
    """Each event as `event: <type>` + `data: <json>`; an error mid-stream is sent as an `error` event."""
    try:
        async for event in events:
            yield f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
    except Exception as error:
        yield f"event: error\ndata: {json.dumps(error_body(as_server_error(error)))}\n\n"
