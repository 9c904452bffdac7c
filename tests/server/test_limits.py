"""The request limits of `ownllm serve` (in process, with small limits): each refusal is a 400 (413 for the body)
naming the field, the limit and the option that sets it; a request without max_tokens gets the server's cap;
and a request running past --request-timeout is stopped with a 408 and its KV blocks freed."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from ownllm.server import ServerSettings, build_app
from ownllm.server.limits import RequestLimits
from tests.server.inprocess import TINY_NAME, inprocess_engine, wait_idle

LIMITS = RequestLimits(max_body_bytes=4000, max_messages=3, max_tokens=8, max_n=2, max_stop=2, max_logprobs=3)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny64_model):
    with inprocess_engine(tiny64_model) as engine:
        yield engine


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, ServerSettings(limits=LIMITS))) as client:
        yield client


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"messages": HI * 4}, "messages",
     "messages has 4 entries but this server allows at most 3 messages (ownllm serve --max-messages)"),
    ("/api/chat", {"model": TINY_NAME, "messages": HI * 4}, "messages",
     "messages has 4 entries but this server allows at most 3 messages (ownllm serve --max-messages)"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 9}, "max_tokens",
     "max_tokens is 9 but this server allows at most 8 tokens per answer (ownllm serve --max-completion-tokens)"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 9}, "max_completion_tokens",
     "max_completion_tokens is 9 but this server allows at most 8 tokens per answer"),
    ("/api/generate", {"model": TINY_NAME, "prompt": "hi", "options": {"num_predict": 9}}, "options.num_predict",
     "options.num_predict is 9 but this server allows at most 8 tokens per answer"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, "n",
     "n is 3 but this server allows at most 2 samples per request (ownllm serve --max-n)"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop",
     "stop has 3 entries but this server allows at most 2 stop sequences (ownllm serve --max-stop)"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1, 2, 3]}, "stop_token_ids",
     "stop_token_ids has 3 entries but this server allows at most 2 stop sequences"),
    ("/api/generate", {"model": TINY_NAME, "prompt": "hi", "options": {"stop": ["a", "b", "c"]}}, "options.stop",
     "options.stop has 3 entries but this server allows at most 2 stop sequences"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 4}, "logprobs",
     "logprobs is 4 but this server allows at most 3 logprobs per token (ownllm serve --max-logprobs)"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 4}, "top_logprobs",
     "top_logprobs is 4 but this server allows at most 3 logprobs per token"),
    ("/api/chat", {"model": TINY_NAME, "messages": HI, "logprobs": True, "top_logprobs": 4}, "top_logprobs",
     "top_logprobs is 4 but this server allows at most 3 logprobs per token"),
])
def test_over_a_limit_is_a_400_naming_it(client, path, body, param, words):
    response = client.post(path, json={"stream": False, **body})
    assert response.status_code == 400
    if path.startswith("/v1"):
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "limit_exceeded"
        assert words in error["message"]
    else:
        assert words in response.json()["error"]


def test_at_the_limits_is_served(client):
    body = {"prompt": "hi", "n": 2, "max_tokens": 8, "stop": ["a", "b"], "logprobs": 3}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": HI * 3, "max_tokens": 2}).status_code == 200


def test_the_token_cap_applies_when_max_tokens_is_absent(client):
    response = client.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True})
    assert response.json()["usage"]["completion_tokens"] == 8
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_a_body_over_the_size_limit_is_a_413(client):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    declared = client.post("/v1/completions", json=big)
    assert declared.status_code == 413
    assert declared.json()["error"]["message"] == (f"the request body is {declared.request.headers['content-length']} "
                                                   "bytes but this server accepts at most 4000 (ownllm serve --max-body-size)")
    chunks = (b"x" * 1000 for _ in range(5))  # no content-length: counted as it arrives
    streamed = client.post("/api/generate", content=chunks)
    assert streamed.status_code == 413 and "at most 4000" in streamed.json()["error"]
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


@pytest.fixture
def slow_forward(engine, monkeypatch):
    """Every model forward takes at least 50 ms: a 60-token answer runs for seconds."""
    model = engine.engine.runner.model
    forward = model.forward

    def slow(*args):
        time.sleep(0.05)
        return forward(*args)

    monkeypatch.setattr(model, "forward", slow)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_the_timeout_is_stopped_and_freed(engine, slow_forward, stream):
    app = build_app(engine, ServerSettings(request_timeout=0.5))
    body = {"prompt": "hi", "ignore_eos": True, "stream": stream}  # to the 64-token context: over 3 s here
    generated_before = engine.stats()["generation_tokens_total"]
    with TestClient(app) as client:  # the server's event loop lives on, so the abort must come from the timeout
        response = client.post("/v1/completions", json=body)
        wait_idle(engine)
    assert engine.stats()["generation_tokens_total"] - generated_before < 40  # stopped, not run to the end
    words = "the request ran longer than this server allows (0.5 s, ownllm serve --request-timeout) and was stopped"
    if stream:  # the answer had started: the error ends the stream
        assert response.status_code == 200 and words in response.text and response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.status_code == 408 and response.json()["error"]["message"] == words
