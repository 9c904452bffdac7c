"""OpenAI's Responses API through the official `openai` client (`client.responses`) against `ownllm serve` on the
bundled SmolLM2: answers equal the chat route's for the same conversation, streaming events joined equal the whole
answer, max_output_tokens, forced function calls valid against their schema, previous_response_id continuing a
conversation (a function-call loop too), retrieve and delete, store false, and unknown ids -> 404."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from ownllm.loader.resolve import BUNDLED_MODEL_NAME
from tests.server.conftest import BUNDLED_KEY

pytestmark = pytest.mark.slow
GREEDY = dict(model=BUNDLED_MODEL_NAME, temperature=0)
# llama.cpp answers this one with Paris; the bare question opens with a near-tie that it takes to "L'Étoile, ..."
QUESTION = "What is the capital of France? Answer in one sentence."
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": WEATHER_SCHEMA},
         {"type": "function", "name": "get_time", "description": "The time in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS]
ASK_WEATHER = "What is the weather in Paris, in celsius?"


@pytest.fixture(scope="module")
def client(bundled_server):
    return openai.OpenAI(base_url=f"{bundled_server.url}/v1", api_key=BUNDLED_KEY, max_retries=0, timeout=120)


def chat(client, messages: list[dict], max_tokens: int = 32, **options):
    return client.chat.completions.create(messages=messages, max_tokens=max_tokens, **GREEDY, **options)


def test_answer_equals_chat(client):
    response = client.responses.create(input=QUESTION, instructions="Answer in one short sentence.",
                                       max_output_tokens=32, **GREEDY)
    assert response.object == "response" and response.status == "completed" and "Paris" in response.output_text
    assert [item.type for item in response.output] == ["message"]
    expected = chat(client, [{"role": "system", "content": "Answer in one short sentence."},
                             {"role": "user", "content": QUESTION}])
    assert response.output_text == expected.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (expected.usage.prompt_tokens,
                                                                           expected.usage.completion_tokens)
    items = client.responses.create(input=[{"role": "developer", "content": "Answer in one short sentence."},
                                           {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
                                    max_output_tokens=32, **GREEDY)
    assert items.output_text == response.output_text


def test_max_output_tokens(client):
    response = client.responses.create(input=QUESTION, max_output_tokens=3, **GREEDY)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_stream_equals_whole_answer(client):
    whole = client.responses.create(input=QUESTION, max_output_tokens=40, **GREEDY)
    events = list(client.responses.create(input=QUESTION, max_output_tokens=40, stream=True, **GREEDY))
    types = [event.type for event in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    completed = events[-1].response
    assert completed.output_text == whole.output_text and completed.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(completed.id).output_text == whole.output_text


@pytest.mark.parametrize("tool_choice, name", [("required", None),
                                               ({"type": "function", "name": "get_time"}, "get_time")])
def test_forced_function_calls_are_valid(client, tool_choice, name):
    response = client.responses.create(input=ASK_WEATHER, tools=TOOLS, tool_choice=tool_choice,
                                       max_output_tokens=100, **GREEDY)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    schemas = {tool["name"]: tool["parameters"] for tool in TOOLS}
    for call in calls:
        assert name is None or call.name == name
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    events = list(client.responses.create(input=ASK_WEATHER, tools=TOOLS, tool_choice=tool_choice,
                                          max_output_tokens=100, stream=True, **GREEDY))
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    assert [e.item_id for e in done] == [item.id for item in events[-1].response.output]
    streamed = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    assert streamed == "".join(call.arguments for call in calls)


def test_previous_response_id_continues(client):
    first = client.responses.create(input=QUESTION, instructions="Be brief.", max_output_tokens=16, **GREEDY)
    second = client.responses.create(input="And of Germany?", previous_response_id=first.id, max_output_tokens=16,
                                     **GREEDY)
    expected = chat(client, [{"role": "user", "content": QUESTION},  # instructions are not carried over
                             {"role": "assistant", "content": first.output_text},
                             {"role": "user", "content": "And of Germany?"}], max_tokens=16)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == expected.usage.prompt_tokens
    assert second.output_text == expected.choices[0].message.content


def test_function_call_loop(client):
    first = client.responses.create(input=ASK_WEATHER, tools=TOOLS, max_output_tokens=100,
                                    tool_choice={"type": "function", "name": "get_weather"}, **GREEDY)
    call = first.output[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees and sunny"}
    second = client.responses.create(input=[result], previous_response_id=first.id, tools=TOOLS, tool_choice="none",
                                     max_output_tokens=32, **GREEDY)
    expected = chat(client, [{"role": "user", "content": ASK_WEATHER},
                             {"role": "assistant", "content": "", "tool_calls": [{
                                 "id": call.call_id, "type": "function",
                                 "function": {"name": call.name, "arguments": call.arguments}}]},
                             {"role": "tool", "tool_call_id": call.call_id, "content": "22 degrees and sunny"}],
                    tools=CHAT_TOOLS, tool_choice="none")
    assert second.usage.input_tokens == expected.usage.prompt_tokens
    assert second.output_text == expected.choices[0].message.content
    replayed = client.responses.create(input=[{"role": "user", "content": ASK_WEATHER}, *first.output, result],
                                       tools=TOOLS, tool_choice="none", max_output_tokens=32, **GREEDY)
    assert replayed.output_text == second.output_text


def test_retrieve_delete_and_store(client):
    response = client.responses.create(input=QUESTION, max_output_tokens=4, **GREEDY)
    assert client.responses.retrieve(response.id).output_text == response.output_text
    client.responses.delete(response.id)
    for act in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as error:
            act(response.id)
        assert error.value.body["message"] == (
            f"no response with id {response.id!r} is stored (it was never stored, was deleted, or was forgotten: "
            "the server keeps the last 1000)")
    unstored = client.responses.create(input=QUESTION, max_output_tokens=4, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(input="hi", previous_response_id=unstored.id, max_output_tokens=4, **GREEDY)
    assert error.value.body["param"] == "previous_response_id"


def test_bad_input_is_named(client, bundled_server):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(input=[{"type": "web_search_call", "id": "x"}], **GREEDY)
    assert error.value.body["message"] == ("input.0.type: input items of type 'web_search_call' are not supported "
                                           "(message, function_call, function_call_output, reasoning)")
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(input=[{"type": "function_call", "call_id": "c1", "name": "f"}], **GREEDY)
    assert error.value.body["message"] == "input.0.arguments: Field required"
    response = httpx.post(f"{bundled_server.url}/v1/responses", headers={"Authorization": f"Bearer {BUNDLED_KEY}"},
                          json={"input": QUESTION, "max_output_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_output_tokens"
