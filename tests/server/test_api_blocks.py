"""An answer's events split into blocks (server/blocks.py), rendered as Anthropic's and the Responses API's stream
events and read back by the official clients' own types and accumulator: reasoning, text and tool calls, which the
bundled model's live tests do not all reach. And the Responses store's size limit (least recently used first)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pydantic
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import ResponseStreamEvent

from ownllm.parsers.events import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from ownllm.server import anthropic as anthropic_api
from ownllm.server.blocks import BlockSplitter, answer_blocks
from ownllm.server.response_store import ResponseStore, StoredResponse
from ownllm.server.responses import _Answer
from ownllm.server.responses_protocol import ResponseObject, ResponsesRequest

EVENTS = [ReasoningDelta("Paris is "), ReasoningDelta("known."), ContentDelta("Let me check."),
          ToolCallStart(0, "call_1", "get_weather"), ToolCallArguments(0, '{"city": '),
          ToolCallArguments(0, '"Paris"}'), ToolCallStart(1, "call_2", "get_time"), ToolCallArguments(1, "{}")]


def changes(events):
    """The events fed one at a time, as a stream would: -> every block change, the last close included."""
    splitter = BlockSplitter()
    result = [change for event in events for change in splitter.feed([event])]
    return result + splitter.close()


def test_blocks_split_where_the_kind_changes():
    blocks = answer_blocks(EVENTS)
    assert [(b.kind, b.text, b.name) for b in blocks] == [
        ("reasoning", "Paris is known.", None), ("text", "Let me check.", None),
        ("tool_call", '{"city": "Paris"}', "get_weather"), ("tool_call", "{}", "get_time")]
    opened = [c.block.index for c in changes(EVENTS) if c.kind == "open"]
    closed = [c.block.index for c in changes(EVENTS) if c.kind == "close"]
    assert opened == closed == [0, 1, 2, 3]


def test_anthropic_client_assembles_the_stream():
    snapshot, buffers = None, {}
    for change in changes(EVENTS):
        wire = json.loads(anthropic_api._stream_event(change).model_dump_json())
        event = pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(wire)
        if snapshot is None:
            snapshot = accumulate_event(event={"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                "usage": {"input_tokens": 1, "output_tokens": 0}}}, current_snapshot=None, json_bufs=buffers)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    assert [block.type for block in snapshot.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert snapshot.content[0].thinking == "Paris is known." and snapshot.content[1].text == "Let me check."
    assert [(b.id, b.name, b.input) for b in snapshot.content[2:]] == [
        ("toolu_1", "get_weather", {"city": "Paris"}), ("toolu_2", "get_time", {})]


def test_responses_stream_events_are_the_clients():
    answer = _Answer(SimpleNamespace(model_name="m"), ResponsesRequest(input="hi"), "resp-abc", 0, 1, [],
                     ResponseStore(1))
    wire = [json.loads(event.model_dump_json()) for change in changes(EVENTS) for event in answer._events(change)]
    events = [pydantic.TypeAdapter(ResponseStreamEvent).validate_python(event) for event in wire]
    assert [e.type for e in events if e.type.endswith(".done")] == [
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done"]
    done_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.id for item in done_items] == ["rs_abc_0", "msg_abc_1", "fc_abc_2", "fc_abc_3"]
    assert done_items[0].content[0].text == "Paris is known." and done_items[1].content[0].text == "Let me check."
    assert [(i.call_id, i.name, i.arguments) for i in done_items[2:]] == [
        ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]


def stored(response_id: str) -> StoredResponse:
    return StoredResponse(ResponseObject(id=response_id, created_at=0, status="completed", model="m", output=[]), [])


def test_store_forgets_the_least_recently_used():
    store = ResponseStore(2)
    store.put(stored("a"))
    store.put(stored("b"))
    assert store.get("a") is not None  # now b is the least recently used
    store.put(stored("c"))
    assert [r for r in ("a", "b", "c") if store.get(r)] == ["a", "c"] and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    off = ResponseStore(0)
    off.put(stored("a"))
    assert off.get("a") is None
