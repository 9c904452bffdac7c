"""A server started with an API key (from OWNLLM_API_KEY), CORS for one origin and --max-waiting 0:
every /v1 and /api route needs the key, /health and /metrics stay open, only the allowed origin gets
CORS headers, and generation is refused with 503 + Retry-After while other routes keep working. The key is
compared in constant time and never logged, and listening beyond this machine without one is warned about."""

from __future__ import annotations

import secrets
import subprocess
import sys

import httpx
import ollama
import openai
import pytest
from starlette.testclient import TestClient

import ownllm.server.app as app_module
from ownllm.server import ServerSettings, build_app
from tests.server.conftest import TINY_NAME, free_port, start_server
from tests.server.inprocess import inprocess_engine

KEY = "s3cret-key"
ORIGIN = "http://app.example"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("logs"), str(tiny_model), "--served-model-name", TINY_NAME,
                      "--cors-origins", f"{ORIGIN},http://other.example", "--max-waiting", "0",
                      env={"OWNLLM_API_KEY": KEY}) as server:
        yield server


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp-1"), ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
    ("GET", "/api/tags"),
    ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/show"), ("GET", "/api/ps"),
    ("GET", "/api/version"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"x-api-key": "wrong"}])
def test_routes_need_the_key(server, method, path, headers):
    response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    if path.startswith("/v1/messages"):  # Anthropic's shape
        assert error["type"] == "authentication_error" and "API key" in error["message"]
    elif path.startswith("/v1"):
        assert error["code"] == "invalid_api_key" and "API key" in error["message"]
    else:
        assert "API key" in error


def test_the_right_key_works(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/api/tags", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).models.list().data[0].id == TINY_NAME
    assert ollama.Client(host=server.url, headers=headers).list().models
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_probes_stay_open(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert "ownllm_num_requests_running" in httpx.get(f"{server.url}/metrics").text


def test_cors_only_for_allowed_origins(server):
    preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    allowed = httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_overload_is_503_with_retry_after(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=2)
        assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "1"
        assert raised.value.body["code"] == "overloaded"
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=2, stream=True)
        with pytest.raises(ollama.ResponseError) as raised:
            ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}).chat(
                model=TINY_NAME, messages=MESSAGES)
        assert raised.value.status_code == 503 and "busy" in raised.value.error
    assert client.models.list().data and httpx.get(f"{server.url}/health").status_code == 200


def test_the_key_is_never_logged(server):
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    httpx.get(f"{server.url}/v1/models?api_key={KEY}x", headers={"Authorization": f"Bearer {KEY}x"})
    assert "GET /v1/models" in server.log.read_text()  # requests are logged, keys are not
    assert KEY not in server.log.read_text().replace(f"api_key={KEY}x", "")


def test_the_key_is_compared_in_constant_time(tiny64_model, monkeypatch):
    compared, constant_time = [], secrets.compare_digest

    def compare_digest(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return constant_time(given, expected)

    monkeypatch.setattr(app_module.secrets, "compare_digest", compare_digest)
    with inprocess_engine(tiny64_model) as engine, TestClient(build_app(engine, ServerSettings(api_key=KEY))) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert compared == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


@pytest.mark.parametrize("host, warns", [("0.0.0.0", True), ("127.0.0.1", False), ("127.0.0.2", False),
                                         ("localhost", False), ("::1", False)])
def test_warns_when_listening_beyond_this_machine_without_a_key(tmp_path, host, warns):
    result = subprocess.run([sys.executable, "-m", "ownllm", "serve", "--host", host, "--port", str(free_port()),
                             "--model", str(tmp_path / "no-such-model")], capture_output=True, text=True, timeout=120)
    warning = f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model"
    assert (warning in result.stderr) is warns, result.stderr
    assert "no-such-model" in result.stderr  # the warning comes first, then the model is looked for
