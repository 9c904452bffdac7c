"""The Ollama API through the official `ollama` client against a real `ownllm serve` on a tiny checkpoint:
chat and generate (streamed and not), options, the final statistics, listings, and the errors."""

from __future__ import annotations

import httpx
import ollama
import pytest

from ownllm import SamplingParams
from tests.server.conftest import TINY_CONTEXT, TINY_NAME

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def client(tiny_server):
    return ollama.Client(host=tiny_server.url, timeout=60)


def _check_final(response, prompt_tokens: int, eval_count: int) -> None:
    assert response.done and response.done_reason in ("stop", "length")
    assert (response.prompt_eval_count, response.eval_count) == (prompt_tokens, eval_count)
    assert response.load_duration == 0
    assert response.total_duration >= response.prompt_eval_duration > 0
    assert response.total_duration >= response.eval_duration >= 0


def test_chat_equals_offline_engine(client, tiny_llm):
    response = client.chat(model=TINY_NAME, messages=MESSAGES, stream=False, options=GREEDY)
    expected = tiny_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert response.message.role == "assistant" and response.message.content == expected.text
    assert response.model == f"{TINY_NAME}:latest"
    _check_final(response, len(tiny_llm.tokenizer.encode_chat(MESSAGES)), len(expected.token_ids))


def test_chat_stream(client):
    full = client.chat(model=TINY_NAME, messages=MESSAGES, stream=False, options=GREEDY)
    chunks = list(client.chat(model=TINY_NAME, messages=MESSAGES, stream=True, options=GREEDY))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == full.message.content
    assert chunks[-1].eval_count == full.eval_count and chunks[-1].done_reason == full.done_reason


def test_generate_and_stream(client, tiny_llm):
    response = client.generate(model=f"{TINY_NAME}:latest", prompt="Numbers 0123", options=GREEDY)
    expected = tiny_llm.chat([{"role": "user", "content": "Numbers 0123"}], SamplingParams(temperature=0, max_tokens=8))
    assert response.response == expected[0].outputs[0].text
    assert response.context == expected[0].prompt_token_ids + expected[0].outputs[0].token_ids
    streamed = list(client.generate(model=TINY_NAME, prompt="Numbers 0123", options=GREEDY, stream=True))
    assert "".join(c.response for c in streamed) == response.response and streamed[-1].done


def test_generate_raw_system_and_context(client, tiny_llm):
    raw = client.generate(model=TINY_NAME, prompt="def main():", raw=True, options=GREEDY)
    expected = tiny_llm.generate("def main():", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert raw.response == expected.text and raw.context is None
    with_system = client.generate(model=TINY_NAME, prompt="hi", system="Be brief.", options=GREEDY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert with_system.prompt_eval_count == len(tiny_llm.tokenizer.encode_chat(messages))
    follow_up = client.generate(model=TINY_NAME, prompt="more", context=with_system.context, options=GREEDY)
    assert follow_up.prompt_eval_count == len(with_system.context) + len(
        tiny_llm.tokenizer.encode_chat([{"role": "user", "content": "more"}]))


def test_options_stop_seed_and_logprobs(client):
    full = client.generate(model=TINY_NAME, prompt="The quick", raw=True, options={**GREEDY, "num_predict": 24})
    stop = next(ch for ch in full.response[3:] if ch.isalnum())
    cut = client.generate(model=TINY_NAME, prompt="The quick", raw=True, options={**GREEDY, "num_predict": 24,
                                                                                   "stop": [stop]})
    assert cut.response == full.response[: full.response.index(stop)] and cut.done_reason == "stop"
    options = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "min_p": 0.01, "repeat_penalty": 1.1,
               "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 3, "num_predict": 6, "num_ctx": 2048}
    runs = [client.generate(model=TINY_NAME, prompt="The quick", options=options, keep_alive="5m") for _ in range(2)]
    assert runs[0].response == runs[1].response
    with_logprobs = client.chat(model=TINY_NAME, messages=MESSAGES, options=GREEDY, logprobs=True, top_logprobs=2)
    assert len(with_logprobs.logprobs) == with_logprobs.eval_count
    assert all(len(lp.top_logprobs) == 2 for lp in with_logprobs.logprobs)


def test_empty_request_loads(client):
    assert client.chat(model=TINY_NAME, messages=[]).done_reason == "load"
    assert client.generate(model=TINY_NAME, prompt="").done_reason == "load"


def test_listings(client, tiny_server):
    models = client.list().models
    assert [m.model for m in models] == [f"{TINY_NAME}:latest"]
    assert models[0].size > 0 and models[0].details.format == "safetensors" and models[0].details.family == "llama"
    shown = client.show(TINY_NAME)
    assert shown.modelinfo["llama.context_length"] == TINY_CONTEXT and "messages" in shown.template
    assert shown.capabilities == ["completion"]
    running = client.ps().models
    assert [m.model for m in running] == [f"{TINY_NAME}:latest"] and running[0].context_length == TINY_CONTEXT
    assert httpx.get(f"{tiny_server.url}/api/version").json()["version"]


@pytest.mark.parametrize("kwargs, status, needle", [
    (dict(model="llama3"), 404, "llama3"),
    (dict(options={"temperature": -1}), 400, "options.temperature"),
    (dict(options={"top_p": 2}), 400, "options.top_p"),
    (dict(options={"repeat_penalty": 0}), 400, "options.repeat_penalty"),
    (dict(options={"num_predict": TINY_CONTEXT}), 400, "options.num_predict"),
    (dict(options={"temperature": "hot"}), 400, "options.temperature"),
    (dict(format={"type": "string", "format": "no-such-format"}), 400, "format cannot be compiled"),
    (dict(think=True), 400, "thinking"),
])
def test_errors(client, kwargs, status, needle):
    request = {"model": TINY_NAME, "messages": MESSAGES, **kwargs}
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(**request)
    assert raised.value.status_code == status and needle in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(**request, stream=True).__next__()
    assert raised.value.status_code == status
    assert client.chat(model=TINY_NAME, messages=MESSAGES, options=GREEDY).done
