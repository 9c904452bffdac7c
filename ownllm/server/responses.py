"""OpenAI's Responses API: POST /v1/responses (JSON or the response.* SSE events), GET and DELETE
/v1/responses/{id}, and how a Responses request becomes a chat prompt and sampling params.

Input items become the chat template's messages (function_call items -> the assistant's tool_calls,
function_call_output items -> tool messages), after the stored conversation that `previous_response_id` names
(response_store.py); `instructions` apply to this request only. Answers are read through the one output layer
and split into output items by blocks.py; this module only renders them. Errors take OpenAI's shape.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ownllm.sampling_params import SamplingParams, StructuredOutputsParams
from ownllm.server.answers import (
    SampleReader, ToolPlan, read_all, reader_factory, template_messages, thinking_budget, tool_plan,
)
from ownllm.server.blocks import Block, BlockChange, BlockSplitter, answer_blocks
from ownllm.server.limits import check_messages
from ownllm.server.openai import check_model
from ownllm.server.response_store import ResponseStore, StoredResponse
from ownllm.server.responses_protocol import (
    ITEM_TYPES, ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent, DeletedResponse, ErrorEvent,
    FunctionCallItem, FunctionCallOutputItem, FunctionToolChoice, IncompleteDetails, InputItem, MessageItem,
    OutputFunctionCall, OutputItem, OutputItemEvent, OutputMessage, OutputReasoning, OutputText, OutputTokensDetails,
    ReasoningText, ResponseEvent, ResponseObject, ResponsesRequest, ResponseUsage, Status, StreamEvent,
    TextDeltaEvent, TextDoneEvent, TextPart,
)
from ownllm.server.serving import (
    ServerContext, ServerError, Timing, as_server_error, check_context, first_and_rest,
    make_params, new_id, parse_body, parse_part, run, sse_response, until_disconnect,
)

ITEM_ID_PREFIXES = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(prefix="/v1/responses")
    store = ResponseStore(ctx.settings.responses_store_size)

    @api.post("")
    async def create(request: Request) -> Response:
        return await serve_response(ctx, store, request)

    @api.get("/{response_id}")
    async def retrieve(response_id: str) -> Response:
        return JSONResponse(_stored(store, response_id).response.model_dump())

    @api.delete("/{response_id}")
    async def delete(response_id: str) -> Response:
        _stored(store, response_id)
        store.delete(response_id)
        return JSONResponse(DeletedResponse(id=response_id).model_dump())

    return api


def _stored(store: ResponseStore, response_id: str, param: str = "response_id") -> StoredResponse:
    stored = store.get(response_id)
    if stored is None:
        raise ServerError(404, f"no response with id {response_id!r} is stored (it was never stored, was deleted, "
                          f"or was forgotten: the server keeps the last {store.max_size})", param=param,
                          code="response_not_found")
    return stored


# ---- requests -> prompt and sampling params


def _input_messages(items: str | list[dict]) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, values in enumerate(items):
        item = _item(values, f"input.{i}")
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, f"input.{i}.content")})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "\n".join(p.text for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return template_messages(messages)


def _item(values: dict, param: str) -> InputItem:
    kind = values.get("type", "message")
    model = ITEM_TYPES.get(kind)
    if model is None:
        raise ServerError(400, f"{param}.type: input items of type {kind!r} are not supported (message, "
                          "function_call, function_call_output, reasoning)", param=f"{param}.type")
    return parse_part(model, values, param)


def _text(content: str | list[dict], param: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, values in enumerate(content):
        if values.get("type") not in ("input_text", "output_text"):
            raise ServerError(400, f"{param}.{j}: only text parts are supported, got a part of type "
                              f"{values.get('type')!r}", param=f"{param}.{j}")
        parts.append(parse_part(TextPart, values, f"{param}.{j}").text)
    return "\n".join(parts)


def _tool_plan(ctx: ServerContext, body: ResponsesRequest) -> tuple[list[dict], ToolPlan]:
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.parameters, "strict": t.strict}}
             for t in body.tools or []]
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    return tools, tool_plan(ctx, tools, choice, body.parallel_tool_calls)


def _structured_outputs(body: ResponsesRequest, plan: ToolPlan) -> StructuredOutputsParams | None:
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return plan.structured_outputs
    if plan.structured_outputs is not None:
        raise ServerError(400, f"text.format cannot be combined with {plan.grammar_reason}", param="tool_choice")
    if text_format.type == "json_object":
        return StructuredOutputsParams(json_object=True, source="text.format")
    if text_format.schema_ is None:
        raise ServerError(400, "text.format json_schema needs text.format.schema", param="text.format.schema")
    return StructuredOutputsParams(json=text_format.schema_, source="text.format")


def _sampling_params(ctx: ServerContext, body: ResponsesRequest, plan: ToolPlan) -> SamplingParams:
    defaults = ctx.engine.default_sampling_params()
    return make_params(dict(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p, top_k=defaults.top_k, min_p=defaults.min_p,
        repetition_penalty=defaults.repetition_penalty,
        max_tokens=body.max_output_tokens, structured_outputs=_structured_outputs(body, plan),
        thinking_budget=thinking_budget(ctx, None, body.reasoning.effort if body.reasoning else None),
        skip_special_tokens=not plan.keep_special_tokens, output_kind="delta",
    ), ctx.settings.limits, {"max_tokens": "max_output_tokens"})


# ---- POST /v1/responses


async def serve_response(ctx: ServerContext, store: ResponseStore, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), ResponsesRequest)
    check_model(ctx, body.model)
    if isinstance(body.input, list):
        check_messages(ctx.settings.limits, len(body.input), "input")
    conversation = _input_messages(body.input)
    if body.previous_response_id:
        conversation = _stored(store, body.previous_response_id, "previous_response_id").conversation + conversation
    if not conversation:
        raise ServerError(400, "input is empty", param="input")
    tools, plan = _tool_plan(ctx, body)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    try:
        prompt_ids = ctx.engine.tokenizer.encode_chat(instructions + conversation, tools=tools or None)
    except (ValueError, TypeError) as error:
        raise ServerError(400, str(error), param="input") from None
    check_context(len(prompt_ids), body.max_output_tokens, ctx.engine.max_model_len, "input", "max_output_tokens")
    answer = _Answer(ctx, body, new_id("resp"), int(time.time()), len(prompt_ids), conversation, store)
    outputs = run(ctx, prompt_ids, _sampling_params(ctx, body, plan), answer.response_id, timing)
    reader = reader_factory(ctx, prompt_ids, plan)()
    if body.stream:
        outputs = await first_and_rest(request, outputs)
        return sse_response(_sse(answer.stream(outputs, reader)))

    await until_disconnect(request, read_all(outputs, [reader]))
    return JSONResponse(answer.finish(reader).model_dump())


@dataclass
class _Answer:
    """One response being made: its output items (the same ids streamed and stored), and its storing."""

    ctx: ServerContext
    body: ResponsesRequest
    response_id: str
    created_at: int
    num_prompt_tokens: int
    conversation: list[dict]  # the template's messages before the answer, instructions left out
    store: ResponseStore

    def response(self, status: Status, output: list[OutputItem], reader: SampleReader | None = None) -> ResponseObject:
        body = self.body
        usage = None if reader is None else ResponseUsage(
            input_tokens=self.num_prompt_tokens, output_tokens=len(reader.token_ids),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=reader.reasoning_tokens()),
            total_tokens=self.num_prompt_tokens + len(reader.token_ids))
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionToolChoice) else body.tool_choice
        return ResponseObject(
            id=self.response_id, created_at=self.created_at, status=status, model=self.ctx.model_name, output=output,
            usage=usage, incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete"
            else None, instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, tools=[t.model_dump() for t in body.tools or []],
            tool_choice=choice or "auto", parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id, store=body.store, metadata=body.metadata or {},
            text=body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {"format": {"type": "text"}})

    def item(self, block: Block, status: Status, text: str | None = None) -> OutputItem:
        text = block.text if text is None else text
        if block.kind == "reasoning":
            return OutputReasoning(id=self._item_id(block), status=status, content=[ReasoningText(text=text)])
        if block.kind == "text":
            return OutputMessage(id=self._item_id(block), status=status, content=[OutputText(text=text)])
        return OutputFunctionCall(id=self._item_id(block), status=status, call_id=block.call_id, name=block.name,
                                  arguments=text)

    def _item_id(self, block: Block) -> str:
        prefix = ITEM_ID_PREFIXES[block.kind]
        return f"{prefix}_{self.response_id.removeprefix('resp-')}_{block.index}"

    def finish(self, reader: SampleReader) -> ResponseObject:
        """The whole response, stored unless the request said `store: false`."""
        status: Status = "incomplete" if reader.finish_reason == "length" else "completed"
        blocks = answer_blocks(reader.events)
        output = [self.item(b, status if i == len(blocks) - 1 else "completed") for i, b in enumerate(blocks)]
        response = self.response(status, output, reader)
        if self.body.store:
            self.store.put(StoredResponse(response, self.conversation + _answer_messages(blocks)))
        return response

    async def stream(self, outputs, reader: SampleReader) -> AsyncIterator[StreamEvent]:
        started = self.response("in_progress", [])
        yield ResponseEvent(type="response.created", response=started)
        yield ResponseEvent(type="response.in_progress", response=started)
        splitter = BlockSplitter()
        async for output in outputs:
            for delta in output.outputs:
                for change in splitter.feed(reader.read(delta)):
                    for event in self._events(change):
                        yield event
        for change in splitter.close():
            for event in self._events(change):
                yield event
        response = self.finish(reader)
        yield ResponseEvent(type=f"response.{response.status}", response=response)

    def _events(self, change: BlockChange) -> list[StreamEvent]:
        block = change.block
        item_id, index = self._item_id(block), block.index
        if change.kind == "open":
            events: list[StreamEvent] = [OutputItemEvent(type="response.output_item.added", output_index=index,
                                                         item=self.item(block, "in_progress", ""))]
            if block.kind != "tool_call":
                events.append(ContentPartEvent(type="response.content_part.added", item_id=item_id,
                                               output_index=index, part=_part(block, "")))
            return events
        kind = "reasoning_text" if block.kind == "reasoning" else "output_text"
        if change.kind == "delta":
            if block.kind == "tool_call":
                return [ArgumentsDeltaEvent(item_id=item_id, output_index=index, delta=change.text)]
            return [TextDeltaEvent(type=f"response.{kind}.delta", item_id=item_id, output_index=index,
                                   delta=change.text)]
        done = OutputItemEvent(type="response.output_item.done", output_index=index,
                               item=self.item(block, "completed"))
        if block.kind == "tool_call":
            return [ArgumentsDoneEvent(item_id=item_id, output_index=index, arguments=block.text), done]
        return [TextDoneEvent(type=f"response.{kind}.done", item_id=item_id, output_index=index, text=block.text),
                ContentPartEvent(type="response.content_part.done", item_id=item_id, output_index=index,
                                 part=_part(block, block.text)), done]


def _part(block: Block, text: str) -> OutputText | ReasoningText:
    return ReasoningText(text=text) if block.kind == "reasoning" else OutputText(text=text)


def _answer_messages(blocks: list[Block]) -> list[dict]:
    """The answer as the template's assistant message, for a later previous_response_id."""
    calls = [{"id": b.call_id, "type": "function", "function": {"name": b.name, "arguments": b.text}}
             for b in blocks if b.kind == "tool_call"]
    message = {"role": "assistant", "content": "".join(b.text for b in blocks if b.kind == "text")}
    return template_messages([{**message, "tool_calls": calls} if calls else message])


async def _sse(events: AsyncIterator[StreamEvent]) -> AsyncIterator[str]:
    """Each event as `event: <type>` + `data: <json>`, numbered; an error mid-stream is sent as an `error` event."""
    number = 0
    try:
        async for event in events:
            event.sequence_number = number
            number += 1
            yield f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
    except Exception as error:
        failure = as_server_error(error)
        event = ErrorEvent(sequence_number=number, code=failure.code, message=failure.message, param=failure.param)
        yield f"event: error\ndata: {json.dumps(event.model_dump())}\n\n"
