"""Agents through the official clients: tool calls (forced by tool_choice, streamed as OpenAI streams them, a
two-turn tool loop), structured outputs over a set of JSON schemas, Ollama's format and tools, and a thinking
model's reasoning split and budget. On the bundled SmolLM2-135M-Instruct (whose template has no tool-call
format: only forced calls apply) and a tiny random Qwen3 with a thinking template."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import ollama
import openai
import pytest

from ownllm.loader.resolve import BUNDLED_MODEL_NAME
from tests.checkpoints import build_thinking_checkpoint
from tests.json_schemas import SCHEMAS
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a time zone",
                                           "parameters": TIME}}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("logs"), None) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_calls(message, names: set[str]) -> None:
    assert message.tool_calls and message.content is None
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_tool_choice_required_and_named_give_calls_that_validate(client):
    answer = client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=0, max_tokens=200)
    assert answer.choices[0].finish_reason == "tool_calls"
    check_calls(answer.choices[0].message, {"get_weather", "get_time"})
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=named,
                                            temperature=0.8, seed=3, max_tokens=200)
    check_calls(answer.choices[0].message, {"get_time"})
    assert len(answer.choices[0].message.tool_calls) == 1


def test_streamed_calls_join_to_the_non_streamed_call(client):
    kwargs = dict(model=BUNDLED_MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                  max_tokens=200)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content  # never markup or JSON in content
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call: index, id, type and name
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments) for call in whole]


def test_a_two_turn_tool_loop(client):
    first = client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=200).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [first.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
    second = client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=messages, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=40)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_json_schema_outputs_all_validate(client):
    def ask(case):
        name, request, schema = case
        answer = client.chat.completions.create(
            model=BUNDLED_MODEL_NAME, messages=[{"role": "user", "content": f"{request} Reply in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            temperature=0, max_tokens=400)
        return name, schema, answer.choices[0]

    assert len(SCHEMAS) >= 30
    with ThreadPoolExecutor(16) as pool:  # batched in the engine, as real traffic would be
        for name, schema, choice in pool.map(ask, SCHEMAS):
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "(?=a)b"}, "response_format cannot be compiled"),
    ({"type": "string", "format": "no-such-format"}, "response_format cannot be compiled"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "response_format cannot be compiled"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, 'Unimplemented keys: ["uniqueItems"]'),
])
def test_unsupported_schemas_are_refused(client, schema, words):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, stream=stream, max_tokens=8,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": schema}})
        assert words in raised.value.body["message"] and raised.value.body["param"] == "response_format"
    assert client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, max_tokens=4).choices


def test_vllm_structured_outputs_field_on_both_endpoints(client):
    chat = client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=ASK, max_tokens=8,
                                          extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert chat.choices[0].message.content in ("sunny", "rainy")
    completion = client.completions.create(model=BUNDLED_MODEL_NAME, prompt="The answer is", max_tokens=12,
                                           extra_body={"structured_outputs": {"regex": "[0-9]{2,4}"}})
    assert completion.choices[0].text.isdigit() and 2 <= len(completion.choices[0].text) <= 4


@pytest.mark.parametrize("body, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names the function 'nope', which is not among tools (get_weather, get_time)"),
    ({"tool_choice": "required"}, 'tool_choice "required" needs tools'),
    ({"tools": [{"type": "function"}]}, "tools.0 must be"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs needs exactly one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format json_schema needs json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with tool_choice required"),
    ({"thinking_budget": 8}, "thinking_budget needs a model that reasons"),
])
def test_bad_agent_requests_name_the_problem(server, body, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": BUNDLED_MODEL_NAME, "messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.text


def test_ollama_format_and_tools(server):
    client = ollama.Client(host=server.url)
    schema = SCHEMAS[0][2]
    answer = client.chat(model=BUNDLED_MODEL_NAME, messages=[{"role": "user", "content": "A person, as JSON."}],
                         format=schema, options={"temperature": 0, "num_predict": 200})
    jsonschema.validate(json.loads(answer.message.content), schema)
    answer = client.generate(model=BUNDLED_MODEL_NAME, prompt='Reply with the JSON object {"ok": true}.',
                             format="json", options={"temperature": 0, "num_predict": 100})
    assert answer.done_reason == "stop" and isinstance(json.loads(answer.response), dict)
    answer = client.chat(model=BUNDLED_MODEL_NAME, messages=ASK, tools=TOOLS, options={"num_predict": 16})
    assert answer.message.content and not answer.message.tool_calls  # no tool-call format in this template
    response = httpx.post(f"{server.url}/api/chat", json={"model": BUNDLED_MODEL_NAME, "messages": ASK,
                                                          "format": "yaml", "stream": False}, timeout=30)
    assert response.status_code == 400 and 'format must be "json" or a JSON schema' in response.json()["error"]


# ---- a thinking model


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thinking")
    build_thinking_checkpoint(folder)
    with start_server(tmp_path_factory.mktemp("logs"), str(folder), "--served-model-name", "thinker") as server:
        yield server


def test_reasoning_is_split_and_the_budget_ends_it(thinking_server):
    client = openai.OpenAI(base_url=f"{thinking_server.url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model="thinker", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=40,
                  extra_body={"thinking_budget": 16, "min_tokens": 40})
    answer = client.chat.completions.create(**kwargs)
    message = answer.choices[0].message
    # 16 reasoning tokens, then the engine's </think>, then the answer
    assert answer.usage.completion_tokens_details.reasoning_tokens == 17
    assert message.reasoning_content and message.content and "</think>" not in message.content
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)
    # Ollama shows the reasoning as `thinking`
    reply = ollama.Client(host=thinking_server.url).chat(
        model="thinker", messages=[{"role": "user", "content": "hi"}], options={"temperature": 0, "num_predict": 8})
    assert reply.message.thinking and not reply.message.content
