"""Anthropic's Messages API through the official `anthropic` client against `ownllm serve` on the bundled SmolLM2:
answers, streaming (joined text equals the whole answer), stop sequences, token counts (equal to the OpenAI
route's prompt tokens for the same conversation), forced tool calls valid against their schema, a tool_use /
tool_result loop, and errors in Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from ownllm.loader.resolve import BUNDLED_MODEL_NAME
from tests.server.conftest import BUNDLED_KEY

pytestmark = pytest.mark.slow
MODEL = BUNDLED_MODEL_NAME
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": WEATHER_SCHEMA},
         {"name": "get_time", "description": "The time in a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False}}]
OPENAI_GREEDY = dict(model=MODEL, temperature=0)
GREEDY = dict(model=MODEL, extra_body={"temperature": 0})  # this client version no longer names temperature


@pytest.fixture(scope="module")
def client(bundled_server):
    return anthropic.Anthropic(base_url=bundled_server.url, api_key=BUNDLED_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def openai_client(bundled_server):
    return openai.OpenAI(base_url=f"{bundled_server.url}/v1", api_key=BUNDLED_KEY, max_retries=0, timeout=120)


def test_answer_with_system_prompt(client, openai_client):
    message = client.messages.create(max_tokens=32, system="Answer in one short sentence.", messages=QUESTION,
                                     **GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and "Paris" in message.content[0].text
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    chat = openai_client.chat.completions.create(
        messages=[{"role": "system", "content": "Answer in one short sentence."}, *QUESTION], max_tokens=32,
        **OPENAI_GREEDY)
    assert message.content[0].text == chat.choices[0].message.content
    assert (message.usage.input_tokens, message.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                         chat.usage.completion_tokens)


def test_max_tokens(client):
    message = client.messages.create(max_tokens=3, messages=QUESTION, **GREEDY)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_stream_equals_whole_answer(client, bundled_server):
    whole = client.messages.create(max_tokens=40, messages=QUESTION, **GREEDY)
    with client.messages.stream(max_tokens=40, messages=QUESTION, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text and final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    with httpx.stream("POST", f"{bundled_server.url}/v1/messages", headers={"x-api-key": BUNDLED_KEY}, json={
            "model": MODEL, "max_tokens": 5, "messages": QUESTION, "stream": True}, timeout=120) as response:
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "ping", "content_block_start"]  # the client hides pings
    assert set(events[3:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_stop_sequences(client):
    whole = client.messages.create(max_tokens=40, messages=QUESTION, **GREEDY).content[0].text
    stop = whole.split()[2]
    message = client.messages.create(max_tokens=40, messages=QUESTION, stop_sequences=[stop, "never seen"], **GREEDY)
    assert message.content[0].text == whole[: whole.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def test_multi_turn_count_tokens(client, openai_client):
    turns = [*QUESTION, {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
             {"role": "user", "content": [{"type": "text", "text": "And of Germany?"}]}]
    counted = client.messages.count_tokens(model=MODEL, system=[{"type": "text", "text": "Be brief."}],
                                           messages=turns)
    chat = openai_client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Germany?"}], max_tokens=1, **OPENAI_GREEDY)
    assert counted.input_tokens == chat.usage.prompt_tokens
    answer = client.messages.create(max_tokens=1, system="Be brief.", messages=turns, **GREEDY)
    assert answer.usage.input_tokens == counted.input_tokens


@pytest.mark.parametrize("tool_choice, name", [({"type": "any"}, None), ({"type": "tool", "name": "get_time"},
                                                                        "get_time")])
def test_forced_tool_use_is_valid(client, tool_choice, name):
    message = client.messages.create(max_tokens=80, tools=TOOLS, tool_choice=tool_choice, messages=[
        {"role": "user", "content": "What is the weather in Paris, in celsius?"}], **GREEDY)
    assert message.stop_reason == "tool_use"
    calls = [block for block in message.content if block.type == "tool_use"]
    assert calls and all(call.id.startswith("toolu_") for call in calls)
    schemas = {tool["name"]: tool["input_schema"] for tool in TOOLS}
    for call in calls:
        assert name is None or call.name == name
        jsonschema.validate(call.input, schemas[call.name])
    with client.messages.stream(max_tokens=80, tools=TOOLS, tool_choice=tool_choice, messages=[
            {"role": "user", "content": "What is the weather in Paris, in celsius?"}], **GREEDY) as stream:
        streamed = stream.get_final_message()
    assert [(c.name, c.input) for c in streamed.content] == [(c.name, c.input) for c in message.content]


def test_tool_loop(client, openai_client):
    ask = {"role": "user", "content": "What is the weather in Paris, in celsius?"}
    first = client.messages.create(max_tokens=80, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"},
                                   messages=[ask], **GREEDY)
    call = first.content[0]
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "22 degrees and sunny"}
    turns = [ask, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    second = client.messages.create(max_tokens=40, tools=TOOLS, tool_choice={"type": "none"}, messages=turns,
                                    **GREEDY)
    assert second.stop_reason in ("end_turn", "max_tokens") and [b.type for b in second.content] == ["text"]
    openai_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                      "parameters": t["input_schema"]}} for t in TOOLS]
    chat = openai_client.chat.completions.create(max_tokens=40, tools=openai_tools, tool_choice="none", messages=[
        ask, {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}], **OPENAI_GREEDY)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.content[0].text == chat.choices[0].message.content




def test_errors_in_anthropic_shape(client, bundled_server):
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=MODEL, max_tokens=0, messages=QUESTION)
    assert error.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Input should be greater than or equal to 1"}}
    response = httpx.post(f"{bundled_server.url}/v1/messages", headers={"x-api-key": BUNDLED_KEY},
                          json={"model": MODEL, "messages": QUESTION})
    assert response.status_code == 400 and response.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert error.value.body["error"]["message"] == (
        "messages.0.content.0.type: content blocks of type 'image' are not supported (text, tool_use, tool_result, "
        "thinking)")
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=MODEL, max_tokens=5, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"},
                               messages=QUESTION)
    assert "'nope', which is not among tools (get_weather, get_time)" in error.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as error:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=QUESTION)
    assert error.value.body["error"]["type"] == "not_found_error"


def test_api_key(bundled_server):
    wrong = anthropic.Anthropic(base_url=bundled_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as error:
        wrong.messages.create(model=MODEL, max_tokens=5, messages=QUESTION)
    assert error.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=bundled_server.url, auth_token=BUNDLED_KEY, max_retries=0, timeout=120)
    assert bearer.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens > 0
