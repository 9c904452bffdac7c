"""Raw HTTP against a real `ownllm serve`: malformed bodies, error shapes, unknown routes, /health,
/metrics, CORS off by default, and clients that leave mid-request (their requests must be aborted).
After each bad request the server must still answer a good one."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import TINY_NAME

CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OLLAMA_CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False,
               "options": {"num_predict": 2}}
ENDLESS = {"ignore_eos": True}  # with no max_tokens: runs to the 4096-token context, seconds on the tiny model


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


def _still_serving(http: httpx.Client) -> None:
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/api/chat", json=OLLAMA_CHAT).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body, needle", [
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    (b"[]", "body"),
    (b"", "required"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "stream": "yes"}', "stream"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "temperature": -1}', "temperature"),
])
def test_openai_bad_bodies(http, path, body, needle):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error" and set(error) == {
        "message", "type", "param", "code"}
    _still_serving(http)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("body, needle", [
    (b'{"model": "tiny", "prompt": ', "not valid JSON"),
    (b'{"prompt": "hi", "messages": []}', "model"),
    (b'{"model": "tiny", "prompt": 5, "messages": "hi"}', "Input should be"),
    (b'{"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "options": {"seed": 1.5}}',
     "options.seed"),
])
def test_ollama_bad_bodies(http, path, body, needle):
    response = http.post(path, content=body)  # like `curl -d`: no JSON content type, still parsed
    assert response.status_code == 400 and needle in response.json()["error"]
    _still_serving(http)


def test_curl_style_body_is_accepted(http):
    body = b'{"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}'
    response = http.post("/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["done"]


def test_unknown_routes_and_methods(http):
    response = http.get("/v1/engines")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    assert http.get("/api/nothing").json() == {"error": "Not Found"}
    assert http.get("/v1/chat/completions").status_code == 405


def test_token_ids_out_of_vocab(http):
    response = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": [1, 10**6], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    _still_serving(http)


def test_health_and_root(http):
    assert http.get("/health").json() == {"status": "ok", "model": TINY_NAME}
    page = http.get("/")  # the chat page, open without the key like /health
    assert page.headers["content-type"].startswith("text/html") and "<title>ownllm chat</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_metrics(http, tiny_server):
    names = ["ownllm_num_requests_running", "ownllm_num_requests_waiting", "ownllm_kv_cache_blocks_used",
             "ownllm_kv_cache_blocks_total", "ownllm_prefix_cache_hit_rate", "ownllm_prompt_tokens_total",
             "ownllm_generation_tokens_total", "ownllm_time_to_first_token_seconds_count",
             "ownllm_inter_token_latency_seconds_count", "ownllm_e2e_request_latency_seconds_count"]
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    before = tiny_server.metrics()
    assert all(name in before for name in names), set(names) - set(before)
    assert before["ownllm_kv_cache_blocks_total"] > 0
    http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "hello there", "max_tokens": 3, **ENDLESS})
    after = tiny_server.metrics()
    assert after["ownllm_generation_tokens_total"] >= before["ownllm_generation_tokens_total"] + 3
    assert after["ownllm_prompt_tokens_total"] > before["ownllm_prompt_tokens_total"]
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert after[f"ownllm_{name}_seconds_count"] > before[f"ownllm_{name}_seconds_count"]
    assert after['ownllm_request_success_total{finish_reason="length"}'] >= 1


def test_prefix_cache_hit_rate(http, tiny_server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    for _ in range(2):
        http.post("/v1/completions", json={"model": TINY_NAME, "prompt": prompt, "max_tokens": 1})
    samples = tiny_server.metrics()
    assert samples["ownllm_prefix_cache_hits_total"] > 0 and 0 < samples["ownllm_prefix_cache_hit_rate"] <= 1


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": None, "stream": True, **ENDLESS}),
    ("/v1/completions", {"model": TINY_NAME, "prompt": ["hi", "there"], "stream": True, **ENDLESS}),
    ("/api/generate", {"model": TINY_NAME, "prompt": "hi", "options": {"num_predict": -1, "temperature": 0}}),
])
def test_disconnect_mid_stream_aborts(http, tiny_server, path, body):
    start = tiny_server.metrics()["ownllm_generation_tokens_total"]
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    idle = tiny_server.wait_idle(timeout=10)
    generated = idle["ownllm_generation_tokens_total"] - start
    assert generated < 1000  # left alone, it would run thousands of tokens to the context
    time.sleep(0.5)
    assert tiny_server.metrics()["ownllm_generation_tokens_total"] - start == generated  # nothing still runs
    _still_serving(http)


def test_disconnect_before_answer_aborts(http, tiny_server):
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "hi", **ENDLESS}, timeout=0.5)
    tiny_server.wait_idle(timeout=10)
    _still_serving(http)


def test_no_cors_by_default(http):
    response = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
